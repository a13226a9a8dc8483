"""Speed ratios measured side by side in one run (docs/design.md, section 10), for `lsqint bench`
and the scripts in benchmarks/.

    qat_overhead     training step time: lsqint QAT and PyTorch's LSQ peer, each / float
    int_inference    images/s: torch integer runtime and the reference, each / float32 eager
    onnx_inference   images/s: ORT float32, ORT int8 QDQ, the three integer ONNX exports, torch-int

Every function returns rows of plain numbers; timings are medians of round-robin rounds so that
machine noise hits every variant alike. Models get random weights with randomized BatchNorm
statistics and activation step sizes calibrated on random pixels: speed does not depend on
training.
"""

from __future__ import annotations

import copy
import io
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import create_model
from ..qat import QuantConfig, calibrate_, prepare_qat
from ..qat.convert import convert
from ..runtime import CompiledProgram, run_reference


def evidence(command: str) -> dict:
    """What a result needs to be trusted later: command, commit, machine, versions."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "command": command,
        "commit": commit or "unknown",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved_timings(
    fns: dict, rounds: int, repeats: int = 1, sync=lambda: None, settle: int = 0
) -> dict:
    """Median seconds per call of each fn, measured round-robin. ``settle``: untimed calls of
    each fn before its timed ones in every round, which absorb what the previous fn left behind
    (ONNX Runtime's and OpenMP's worker threads spin for a while after a run, taking the cores
    from whatever runs next)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def path_counts(compiled: CompiledProgram) -> str:
    """Which path each op of a compiled program takes, counted: 'native 32, onednn-int8 21'."""
    counts = Counter(compiled.paths.values())
    return ", ".join(f"{path} {n}" for path, n in counts.most_common())


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def randomized_model(name: str, image_size: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, 10, image_size)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _images(model: str, batch: int, image_size: int) -> torch.Tensor:
    channels = 1 if model == "digits_cnn" else 3
    gen = torch.Generator().manual_seed(0)
    return torch.randint(
        0, 256, (batch, channels, image_size, image_size), dtype=torch.uint8, generator=gen
    )


def program_for(model: str, bits: int, images: torch.Tensor, image_size: int):
    qat = prepare_qat(
        randomized_model(model, image_size), QuantConfig(weight_bits=bits, act_bits=bits), images
    )
    calibrate_(qat, images[:64])
    return convert(qat)


# -- QAT step ------------------------------------------------------------------------------------
def torch_ao_lsq(model: nn.Module, example: torch.Tensor, w_bits: int, a_bits: int) -> nn.Module:
    """The nearest peer: torch.ao prepare_qat_fx with _LearnableFakeQuantize (LSQ with gradient
    scaling), per-tensor symmetric weights (its per-channel learnable path needs extra care)."""
    from torch.ao.quantization import QConfig, QConfigMapping, disable_observer
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    act = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=2**a_bits - 1,
        dtype=torch.quint8,
        use_grad_scaling=True,
    )
    weight = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=-(2 ** (w_bits - 1)),
        quant_max=2 ** (w_bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
        use_grad_scaling=True,
    )
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    model.train()
    prepared = prepare_qat_fx(model, mapping, (example.float(),))
    prepared(example.float())  # observers set the initial scales once, like LSQ's calibration
    prepared.apply(disable_observer)
    return prepared


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def qat_overhead(
    model: str = "resnet20",
    device: str = "cpu",
    batch: int = 128,
    bits: tuple[int, int] = (4, 4),
    rounds: int = 5,
    repeats: int = 3,
    image_size: int = 32,
) -> list[dict]:
    dev = torch.device(device)
    images = _images(model, batch, image_size).to(dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    w_bits, a_bits = bits
    float_model = randomized_model(model, image_size).to(dev)
    qat = prepare_qat(
        randomized_model(model, image_size),
        QuantConfig(weight_bits=w_bits, act_bits=a_bits),
        images.cpu(),
    ).to(dev)
    calibrate_(qat, images)
    steps = {
        "float": _train_step(float_model, images.float(), labels),
        "lsqint": _train_step(qat, images, labels),
    }
    try:
        peer = torch_ao_lsq(randomized_model(model, image_size).to(dev), images, w_bits, a_bits)
        steps["torch.ao"] = _train_step(peer, images.float(), labels)
    except Exception as err:  # report the reason in the table instead of hiding the row
        print(f"torch.ao peer unavailable: {type(err).__name__}: {err}")
    for fn in steps.values():
        fn()
        fn()
    times = interleaved_timings(steps, rounds, repeats, _sync(dev))
    return [
        {"variant": k, "ms_per_step": 1000 * t, "ratio_to_float": t / times["float"]}
        for k, t in times.items()
    ]


# -- integer inference ---------------------------------------------------------------------------
def int_inference(
    model: str = "resnet20",
    device: str = "cpu",
    batch: int = 256,
    bits_list=(4, 8),
    rounds: int = 5,
    reference_images: int = 16,
    image_size: int = 32,
    int8_gemm: bool | None = None,
) -> list[dict]:
    """``int8_gemm`` (default: on CUDA) adds the torch runtime with int8 GEMM convolutions
    (``torch-int8``) and, on CUDA, the float model in float16 (cuDNN's tensor-core peer)."""
    dev = torch.device(device)
    int8_gemm = dev.type == "cuda" if int8_gemm is None else int8_gemm
    images = _images(model, batch, image_size)
    images_dev = images.to(dev)
    float_model = randomized_model(model, image_size).to(dev)
    # The same float model in channels_last, the fastest eager layout on CPU: reported beside
    # the default layout so the integer runtime's own channels_last use is not mistaken for a win.
    float_cl = randomized_model(model, image_size).to(dev).to(memory_format=torch.channels_last)
    images_cl = images_dev.contiguous(memory_format=torch.channels_last)
    if dev.type == "cuda":
        half_cl = copy.deepcopy(float_cl).half()
        images_half = images_cl.half()

        def float16_run():
            with torch.no_grad():
                half_cl(images_half)

    rows = []
    for bits in bits_list:
        program = program_for(model, bits, images, image_size)
        compiled = CompiledProgram(program, dev)

        def float_run():
            with torch.no_grad():
                float_model(images_dev)

        def float_cl_run():
            with torch.no_grad():
                float_cl(images_cl)

        def int_run(compiled=compiled):
            compiled(images_dev)

        runs = {"float32": float_run, "float32-cl": float_cl_run, "torch-int": int_run}
        if int8_gemm:
            compiled_int8 = CompiledProgram(program, dev, int8_gemm=True)
            runs["torch-int8"] = lambda c=compiled_int8: c(images_dev)
        if dev.type == "cuda":
            runs["float16-cl"] = float16_run
        for fn in runs.values():
            fn()  # warm-up: oneDNN/cuBLAS plans, CUDA context
        times = interleaved_timings(runs, rounds, 1, _sync(dev))
        ref_batch = images[:reference_images].numpy()
        start = time.perf_counter()
        expected = run_reference(program, ref_batch)
        ref_s = (time.perf_counter() - start) / len(ref_batch)
        if not np.array_equal(compiled(ref_batch), expected):
            raise AssertionError("torch runtime differs from the reference")
        extra = {}
        if int8_gemm:
            if not np.array_equal(compiled_int8(ref_batch), expected):
                raise AssertionError("torch runtime (int8 GEMM) differs from the reference")
            int8_ips = batch / times["torch-int8"]
            extra["torch_int8_images_per_s"] = int8_ips
            extra["torch_int8_ratio"] = int8_ips / (batch / times["float32"])
            extra["torch_int8_paths"] = sorted(set(compiled_int8.paths.values()))
        if "float16-cl" in times:
            extra["float16_cl_images_per_s"] = batch / times["float16-cl"]
        float_ips, int_ips = batch / times["float32"], batch / times["torch-int"]
        float_cl_ips = batch / times["float32-cl"]
        rows.append(
            {
                "bits": f"W{bits}A{bits}",
                "float32_images_per_s": float_ips,
                "float32_cl_images_per_s": float_cl_ips,
                "torch_int_images_per_s": int_ips,
                "torch_int_ratio": int_ips / float_ips,
                "torch_int_ratio_vs_cl": int_ips / float_cl_ips,
                "reference_images_per_s": 1 / ref_s,
                "reference_ratio": (1 / ref_s) / float_ips,
                "paths": sorted(set(compiled.paths.values())),
                **extra,
            }
        )
    return rows


# -- ONNX Runtime ---------------------------------------------------------------------------------
def onnx_inference(
    model: str = "resnet20",
    batch: int = 256,
    bits_list=(4, 8),
    rounds: int = 5,
    image_size: int = 32,
    programs: dict | None = None,
    threads: int = 0,
) -> list[dict]:
    """img/s of ONNX Runtime float32 (the float model), ONNX Runtime's int8 QDQ path (W8A8, the
    speed CPU users get today, not exact), lsqint's three integer ONNX exports (int, int-float,
    qlinear) and the torch runtime, timed interleaved in one run. ``programs`` (label -> trained
    IntProgram of ``model``) replaces the random-weight programs of ``bits_list``. ``threads``:
    ONNX Runtime's intra-op threads (0: its default)."""
    import onnxruntime as ort

    from ..export.onnx_int import ExportError, OnnxSession
    from ..export.onnx_qdq import to_qdq_model

    images = _images(model, batch, image_size)
    images_np = images.numpy()
    images_f = images_np.astype(np.float32)
    buf = io.BytesIO()
    torch.onnx.export(
        randomized_model(model, image_size),
        (images.float(),),
        buf,
        input_names=["input"],
        output_names=["logits"],
        dynamo=False,
        opset_version=17,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    fsess = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    if programs is None:
        programs = {f"W{b}A{b}": program_for(model, b, images, image_size) for b in bits_list}
    # The QDQ baseline: the first W8A8 program measured (trained weights), else a random one.
    qdq_model = None
    for program in programs.values():
        try:
            qdq_model = to_qdq_model(program)
            break
        except ExportError:  # sub-8-bit: no QDQ form
            continue
    qdq_model = qdq_model or to_qdq_model(program_for(model, 8, images, image_size))
    qdq = ort.InferenceSession(
        qdq_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rows = []
    for label, program in programs.items():
        sessions = {
            "ort-int": OnnxSession(program, threads=threads),
            "ort-int-float": OnnxSession(program, exact_float=True, threads=threads),
            "ort-qlinear": OnnxSession(program, qlinear=True, threads=threads),
        }
        compiled = CompiledProgram(program)
        float_paths = CompiledProgram(program, cpu_kernels=False)  # the runtime without them
        expected = compiled(images_np[:8])
        if not np.array_equal(float_paths(images_np[:8]), expected):
            raise AssertionError("the torch runtime's two CPU paths differ")
        for name, session in sessions.items():
            if not np.array_equal(session(images_np[:8]), expected):
                raise AssertionError(f"{name} differs from the torch runtime")
        fns = {
            "ort-float32": lambda: fsess.run(["logits"], {"input": images_f}),
            "ort-qdq-w8a8": lambda: qdq.run(None, {"input": images_np}),
            **{name: (lambda s=session: s(images_np)) for name, session in sessions.items()},
            "torch-int": lambda compiled=compiled: compiled(images_np),
            "torch-int-float-paths": lambda compiled=float_paths: compiled(images_np),
        }
        for fn in fns.values():
            fn()
        timings = interleaved_timings(fns, rounds, settle=1)
        ips = {k: batch / v for k, v in timings.items()}
        rows.append(
            {
                "program": label,
                **{f"{k.replace('-', '_')}_images_per_s": v for k, v in ips.items()},
                "ort_qlinear_vs_qdq": ips["ort-qlinear"] / ips["ort-qdq-w8a8"],
                "ort_qlinear_vs_float32": ips["ort-qlinear"] / ips["ort-float32"],
                "torch_int_vs_qdq": ips["torch-int"] / ips["ort-qdq-w8a8"],
                "torch_int_paths": path_counts(compiled),
            }
        )
    return rows


def write_json(path: str, payload: dict) -> None:
    """Write a benchmark result (with its evidence inside) and say where."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def script_result(name: str, args, rows: list[dict]) -> dict:
    """What a benchmarks/*.py script saves: its name, its arguments, rows and evidence."""
    import sys

    return {"benchmark": name, **vars(args), "rows": rows, "evidence": evidence(" ".join(sys.argv))}


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of rows (numbers to 3 significant decimals)."""
    keys = list(rows[0])
    cells = [[k for k in keys]] + [
        [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    )


def bench_all(model: str, device: str, rounds: int, skip_onnx: bool = False) -> dict:
    """Everything `lsqint bench` reports, in one run."""
    import sys

    result = {
        "model": model,
        "device": device,
        "evidence": evidence(" ".join(["lsqint", *sys.argv[1:]])),
    }
    result["qat_overhead"] = qat_overhead(model, device, rounds=rounds)
    result["int_inference"] = int_inference(model, device, rounds=rounds)
    if not skip_onnx:
        try:
            result["onnx_inference"] = onnx_inference(model, rounds=rounds)
        except ImportError as err:
            result["onnx_inference_skipped"] = str(err)
    return result

"""The generated C on a microcontroller and on this host: flash, RAM, speed, exactness.

    python benchmarks/c_deploy.py [--cifar-root ../shared/data/cifar10] [--json OUT.json]

Programs: digits_cnn trained here (float 25 epochs, then QAT at W8A8 / W4A4 / W2A2, the test
suite's settings) and the CIFAR-10 resnet20 programs committed under docs/results/ (W4A4, W3A3,
W2A2; no W8A8 CIFAR-10 program has been trained yet). For each one:
- Cortex-M4 (arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=soft -Os, the Arm DSP
  extension's kernels): flash and static RAM of the model's object file, and the int8-weight
  layout's size for comparison (TFLite Micro stores weights one byte each); the firmware run
  under qemu on real images, logits == reference.
- This host, one thread: images/s of the C compiled with -O3 against the torch runtime.

Then the instruction counts on the emulated Cortex-M4 (qemu mps2-an386, -icount shift=0, the
board's 25 MHz counter read around each inference: one tick is 40 instructions): instructions
per inference and per MAC at -O2 and -Os, with the Arm DSP extension's kernels (the Cortex-M4
default) and with the portable kernels (-DLQ_PORTABLE), for every program above and for
random-weight MLPerf Tiny ResNet-8 and resnet20 programs at W8A8 / W4A4 / W3A3 / W2A2 and the
trained ResNet-8 programs of docs/results/cifar10_mlperf_resnet8 (where present), beside MLPerf
Tiny's published Cortex-M4 (STM32L4R5, 120 MHz) ResNet-8 latencies in cycles per MAC.
Instructions are a lower bound on cycles, not cycles. `--mcu-only` skips the digits training
and the host speed.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lsqint.app.bench import format_rows, script_result, write_json
from lsqint.app.evaluation import images_and_labels
from lsqint.app.workflow import digits_args, train_float, train_qat
from lsqint.data import load_data
from lsqint.export.c_code import generate_c
from lsqint.export.c_host import CompiledC
from lsqint.export.mcu import (
    build_firmware,
    model_object_sizes,
    node_instructions,
    node_macs,
    program_macs,
    run_qemu,
)
from lsqint.intprog.artifact import load
from lsqint.runtime import compile_program, run

RESULTS = Path("docs/results/cifar10_resnet20_lowbit")
RESNET8 = Path("docs/results/cifar10_mlperf_resnet8")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--cifar-root", default="../shared/data/cifar10")
p.add_argument("--host-images", type=int, default=512)
p.add_argument("--qemu-images", type=int, default=8)
p.add_argument("--json", default="bench_results/c_deploy.json")
p.add_argument("--count-images", type=int, default=2, help="images per instruction count")
p.add_argument("--mcu-only", action="store_true", help="only the instruction counts")
args = p.parse_args()

# MLPerf Tiny v1.x image classification (ResNet-8, 12,501,632 MACs) on its Cortex-M4 board
# (STM32L4R5 at 120 MHz): published latency * 120 MHz / MACs.
MACS_RESNET8 = 12_501_632
ANCHORS = {
    "ST X-CUBE-AI 9.0": 165e-3,
    "Plumerai": 168e-3,
    "microTVM + CMSIS-NN": 390e-3,
    "TFLite Micro reference": 704e-3,
}
ANCHOR_CYCLES_PER_MAC = {k: round(s * 120e6 / MACS_RESNET8, 2) for k, s in ANCHORS.items()}
torch.set_num_threads(1)


def programs(work: Path):
    base = dict(seed=0, log_dir=str(work), progress=False)
    train_float(digits_args(epochs=25, lr=0.05, **base))
    digits = load_data("digits", None).val
    images, _ = images_and_labels(digits)
    for bits in (8, 4, 2):
        qat = train_qat(digits_args(epochs=10, lr=0.01, w_num_bits=bits, a_num_bits=bits, **base))
        yield f"digits_cnn W{bits}A{bits}", load(qat["program"]), images.numpy()
    cifar = images_and_labels(load_data("cifar10", args.cifar_root).val, args.host_images)[0]
    for name in ("w4a4", "w3a3", "w2a2", "w2a2_long"):
        path = RESULTS / f"{name}.intprog.safetensors"
        yield f"cifar10 resnet20 {name.upper()}", load(path), cifar.numpy()


def images_per_s(fn, images) -> float:
    fn(images[:8])  # warm up
    start = time.perf_counter()
    fn(images)
    return len(images) / (time.perf_counter() - start)


def random_programs():
    """Random-weight programs (BatchNorm statistics from one batch) of the MLPerf Tiny ResNet-8
    and resnet20: the shapes users compare, without a trained model."""
    from lsqint.app.bench import program_for

    for model in ("mlperf_resnet8", "resnet20"):
        images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)  # calibration batch
        for bits in (8, 4, 3, 2):
            yield f"{model} W{bits}A{bits} (random)", program_for(model, bits, images, 32), images


def summary(rows: list[dict]) -> list[dict]:
    """The rows without their per-layer lists (for printing)."""
    return [{k: v for k, v in row.items() if k != "dsp_layers-O2"} for row in rows]


def instruction_rows(label, program, images, tmp: Path) -> dict:
    """Instructions per inference and per MAC of the DSP kernels (the Cortex-M4 default) and of
    the portable kernels (-DLQ_PORTABLE), at -O2 and -Os; model flash (-Os) of each layout."""
    images = np.ascontiguousarray(images[: args.count_images])
    expected = run(program, images)
    macs = program_macs(program)
    row = {"program": label, "macs": macs}
    # the DSP build's kernel per conv/linear, counted: {"dsp-smlad": 2, "dsp-pack4 n=6": 7}
    export = generate_c(program)[2]
    dsp_kernels = export.dsp_kernels
    row["dsp_kernels"] = {
        k: list(dsp_kernels.values()).count(k) for k in sorted(set(dsp_kernels.values()))
    }
    # peak RAM of the model besides the stack: the planned arena and each build's scratch
    row["arena_bytes"] = export.arena_bytes
    row["dsp_scratch_bytes"] = export.dsp_scratch_bytes
    row["portable_scratch_bytes"] = export.scratch_bytes
    for kernels in ("dsp", "portable"):
        for opt in ("-O2", "-Os"):
            out = tmp / f"count{kernels}{opt}"
            firmware = build_firmware(program, images, out, opt=opt, portable=kernels == "portable")
            logits, instructions = run_qemu(firmware, count=True)
            assert np.array_equal(logits, expected), f"{label} {kernels} {opt}: qemu != reference"
            per_image = int(np.median(instructions))
            row[f"{kernels}_instr{opt}"] = per_image
            row[f"{kernels}_per_mac{opt}"] = round(per_image / macs, 2)
        if kernels == "dsp":  # each layer's kernel and instructions (-O2, one image)
            profiled = build_firmware(program, images[:1], tmp / "profile", opt="-O2", profile=True)
            per_node = node_instructions(profiled)
            row["dsp_layers-O2"] = [
                {
                    "node": node.name,
                    "op": node.op,
                    "kernel": dsp_kernels.get(node.name, ""),
                    "instructions": int(count),
                    "per_mac": round(count / node_macs(program, node), 2)
                    if node.op in ("conv2d", "linear")
                    else None,
                }
                for node, count in zip(program.nodes, per_node, strict=True)
                if count > 0
            ]
        sizes = model_object_sizes(out / "model.c", portable=kernels == "portable")
        row[f"{kernels}_model_flash_Os"] = sizes["flash_bytes"]
        row[f"{kernels}_firmware_static_ram"] = firmware.data_bytes + firmware.bss_bytes
    return row


rows, mcu_rows = [], []
with tempfile.TemporaryDirectory() as tmp:
    trained = [] if args.mcu_only else programs(Path(tmp) / "runs")
    for label, program, images in trained:
        images = images[: args.host_images]
        out = Path(tmp) / label.replace(" ", "_")
        host = CompiledC(program, opt="-O3")
        reference = run(program, images)
        assert np.array_equal(host(images), reference), f"{label}: host C != reference"
        torch_program = compile_program(program)
        c_speed = images_per_s(host, images)
        torch_speed = images_per_s(torch_program, images)
        sizes = model_object_sizes(host.export.source)
        firmware = build_firmware(program, images[: args.qemu_images], out)
        start = time.perf_counter()
        qemu_logits = run_qemu(firmware)
        qemu_s = time.perf_counter() - start
        exact = bool(np.array_equal(qemu_logits, reference[: args.qemu_images]))
        rows.append(
            {
                "program": label,
                "m4_flash_bytes": sizes["flash_bytes"],
                "weights_bytes": host.export.weight_bytes,
                "int8_weights_bytes": host.export.int8_weight_bytes,
                "m4_ram_bytes": sizes["ram_bytes"],
                "arena_bytes": host.export.arena_bytes,
                "qemu_exact": f"{exact} ({args.qemu_images} images, {qemu_s:.1f} s)",
                "host_c_img_s": round(c_speed, 1),
                "host_torch_img_s": round(torch_speed, 1),
            }
        )
        print(format_rows(rows[-1:]))
        mcu_rows.append(instruction_rows(label, program, images, out))
    if args.mcu_only:  # the committed CIFAR-10 programs, without the digits training
        cifar = images_and_labels(load_data("cifar10", args.cifar_root).val, args.count_images)[0]
        for name in ("w4a4", "w2a2"):
            program = load(RESULTS / f"{name}.intprog.safetensors")
            label = f"cifar10 resnet20 {name.upper()} (trained)"
            mcu_rows.append(instruction_rows(label, program, cifar.numpy(), Path(tmp) / name))
    if RESNET8.is_dir():  # the trained MLPerf Tiny ResNet-8 programs
        cifar = images_and_labels(load_data("cifar10", args.cifar_root).val, args.count_images)[0]
        for path in sorted(RESNET8.glob("*.intprog.safetensors")):
            label = f"cifar10 mlperf_resnet8 {path.name.split('.')[0].upper()} (trained)"
            out = Path(tmp) / path.name.split(".")[0]
            mcu_rows.append(instruction_rows(label, load(path), cifar.numpy(), out))
            print(format_rows(summary(mcu_rows[-1:])))
    for label, program, images in random_programs():
        mcu_rows.append(instruction_rows(label, program, images.numpy(), Path(tmp) / label[:9]))
        print(format_rows(summary(mcu_rows[-1:])))
if rows:
    print(format_rows(rows))
print(format_rows(summary(mcu_rows)))
print("MLPerf Tiny ResNet-8 on the Cortex-M4 board, cycles per MAC:", ANCHOR_CYCLES_PER_MAC)
result = script_result("c_deploy", args, rows)
result.update(instructions=mcu_rows, mlperf_tiny_cycles_per_mac=ANCHOR_CYCLES_PER_MAC)
write_json(args.json, result)

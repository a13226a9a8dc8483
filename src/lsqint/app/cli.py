"""Command line: thin argparse wrappers over the workflow, infer, sweep and bench modules
(the seed project's flag names)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import LsqintError, UsageError


def _at_least(lowest: int | float, kind=int):
    """argparse type: a number >= lowest, else a one-line usage error naming the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value >= lowest:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is below the smallest allowed, {lowest}")
        return value

    return parse


class _FromRecipe:
    """Default of the flags that `lsqint qat` and `lsqint sweep` take from the QAT recipe
    (lsqint.qat.recipe) when the command line does not give them. Not a string: argparse would
    pass a string default through the flag's type."""

    def __repr__(self) -> str:
        return "the recipe's"


FROM_RECIPE = _FromRecipe()


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that reads a model's dataset and run folder."""
    p.add_argument("--model", default="resnet20", help="model name (see lsqint.models)")
    p.add_argument(
        "--dataset",
        default="cifar10",
        help="digits | synthetic | cifar10 | cifar100 | imagenet | tiny-imagenet | folder",
    )
    p.add_argument("--data-root", default=None, help="dataset folder (else $CIFAR10_ROOT, ...)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing")
    p.add_argument("-tb", "--test-batch-size", type=_at_least(1), default=256)
    p.add_argument(
        "--cuda", type=int, default=None, help="GPU id; -1 for CPU (default: GPU 0 when available)"
    )
    p.add_argument("--image-size", type=_at_least(1), default=None)
    p.add_argument("--num-classes", type=_at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs", help="root folder of checkpoints and logs")
    p.add_argument(
        "--workers", type=_at_least(0), default=2, help="DataLoader workers (folder datasets)"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _common(
    p: argparse.ArgumentParser,
    lr: float | _FromRecipe,
    epochs: int | _FromRecipe,
    weight_decay: float | _FromRecipe = 5e-4,
    recipe: bool = False,
) -> None:
    """The flags every training command takes; ``recipe``: --grad-clip defaults to the QAT
    recipe's (FROM_RECIPE)."""
    _data_flags(p)
    p.add_argument("-e", "--epochs", type=_at_least(1), default=epochs)
    p.add_argument("-b", "--batch-size", type=_at_least(1), default=128)
    p.add_argument("--lr", type=_at_least(0.0, float), default=lr)
    p.add_argument("--momentum", type=_at_least(0.0, float), default=0.9)
    p.add_argument("--weight-decay", "--wd", type=_at_least(0.0, float), default=weight_decay)
    p.add_argument(
        "--grad-clip",
        type=lambda s: None if s.lower() == "none" else _at_least(1e-12, float)(s),
        default=FROM_RECIPE if recipe else None,
        help="clip the gradients' total L2 norm to this before each step ('none': no clipping)"
        + ("; default: the QAT recipe's" if recipe else ""),
    )
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt of this run")
    p.add_argument(
        "--overwrite", action="store_true", help="let a fresh run replace the run in its folder"
    )
    p.add_argument("--max-steps-per-epoch", type=_at_least(1), default=None, help=argparse.SUPPRESS)


def _bits_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--w-num-bits", type=int, default=4, help="weight bits (2-8)")
    p.add_argument("-a", "--a-num-bits", type=int, default=4, help="activation bits (2-8)")


def _runtime_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    """--runtime, its choices read from the runtime registry (checked before any work)."""
    from ..runtime import RUNTIMES

    p.add_argument("--runtime", default="torch", choices=sorted(RUNTIMES), help=help_text)


def _quant_flags(p: argparse.ArgumentParser, bits: bool = True, recipe: bool = False) -> None:
    """-w/-a (unless ``bits`` is False: the sweep takes pairs), weight layout, first/last bits;
    ``recipe``: --residual-bits defaults to the QAT recipe's."""
    if bits:
        _bits_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=True)
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    p.add_argument(
        "--first-last-bits",
        type=lambda s: None if s.lower() == "none" else int(s),
        default=8,
        help="bits of the first/last layer ('none' = same as the rest)",
    )
    p.add_argument(
        "--residual-bits",
        type=lambda s: None if s.lower() == "none" else int(s),
        default=FROM_RECIPE if recipe else None,
        help="bits of the residual stream: what residual adds read (convs read it "
        "requantized to the activation bits; 'none' = the activation bits)"
        + ("; default: the QAT recipe's" if recipe else ""),
    )
    p.add_argument(
        "--scale-init",
        choices=("mse", "lsq"),
        default="mse",
        help="step-size initialization: mse (least quantization error; default) or lsq "
        "(the paper's 2*mean|x|/sqrt(qmax), which collapses 2-bit ReLU outputs)",
    )
    p.add_argument(
        "--bn-aware-epochs",
        type=_at_least(0),
        default=0,
        help="BN-aware QAT: BatchNorm keeps normalizing with batch statistics (the quantizer "
        "sees the folded weights) for this many epochs, then folds for good (0: fold at start)",
    )


def _distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="knowledge distillation from a float teacher (default: on when a float teacher "
        "is found: --teacher, the float --init, or this model's float run)",
    )
    p.add_argument("--distill-t", type=float, default=4.0, help="distillation temperature")
    p.add_argument(
        "--distill-alpha", type=float, default=0.5, help="weight of the distillation term (0-1)"
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="float teacher checkpoint (default: the float --init, else this model's float run)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsqint", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lsqint {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="float training (seed: main.py)")
    _common(p, lr=0.1, epochs=200)
    p.add_argument("--init", default=None, help="start from this float checkpoint")

    p = sub.add_parser(
        "qat",
        help="LSQ quantization-aware training (seed: q_main.py); -e, --lr, --wd, --grad-clip "
        "and --residual-bits default to the QAT recipe for the bits (lsqint.qat.recipe)",
    )
    _common(p, lr=FROM_RECIPE, epochs=FROM_RECIPE, weight_decay=FROM_RECIPE, recipe=True)
    _quant_flags(p, recipe=True)
    _distill_flags(p)
    p.add_argument(
        "--init",
        default=None,
        help="float checkpoint, or a QAT checkpoint at other bits (progressive initialization); "
        "default: the best float checkpoint of this model and dataset under --log-dir",
    )

    p = sub.add_parser("infer", help="integer-only evaluation (seed: q_inference.py)")
    _data_flags(p)
    _bits_flags(p)
    p.add_argument(
        "--program",
        default=None,
        help="integer program file (default: the one "
        "next to the QAT checkpoint of this model, dataset and bits)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="QAT checkpoint for the fake-quant comparison (default: best.pt next to the program)",
    )
    _runtime_flag(p, "torch-int8: int8 GEMMs (for CUDA); reference: numpy, the definition")
    p.add_argument(
        "--limit", type=_at_least(1), default=None, help="evaluate N evenly spaced images only"
    )
    p.add_argument("--json", default=None, help="also write the results here")

    p = sub.add_parser("sweep", help="float baseline + QAT at several W/A pairs, one report")
    _common(p, lr=0.1, epochs=0, recipe=True)  # --lr, --wd: the float baseline's
    p.add_argument("--pairs", default="8,8 4,4 3,3 2,2 4,6 6,4", help="W,A pairs")
    p.add_argument("--float-epochs", type=_at_least(1), default=200)
    p.add_argument(
        "--qat-epochs", type=_at_least(1), default=FROM_RECIPE, help="default: the recipe's"
    )
    p.add_argument(
        "--qat-lr", type=_at_least(0.0, float), default=FROM_RECIPE, help="default: the recipe's"
    )
    p.add_argument(
        "--qat-wd", type=_at_least(0.0, float), default=FROM_RECIPE, help="default: the recipe's"
    )
    p.add_argument("--float-init", default=None, help="use this float checkpoint as the baseline")
    p.add_argument("--out", default="sweep", help="folder for runs, sweep.json/.md/.png")
    _runtime_flag(p, "runtime for the integer top-1")
    p.add_argument(
        "--reevaluate", action="store_true", help="measure finished pairs again (no retraining)"
    )
    p.add_argument(
        "--progressive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start a pair from a finished pair at most one bit above it on each side "
        "(W4A4 -> W3A3 -> W2A2), else from the float model",
    )
    _quant_flags(p, bits=False, recipe=True)
    _distill_flags(p)

    p = sub.add_parser("bench", help="speed ratios side by side in one run, as JSON")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--rounds", type=_at_least(1), default=5)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime comparison")
    p.add_argument("--json", default="bench_results/bench.json")

    p = sub.add_parser("export", help="integer program -> ONNX, or C for microcontrollers")
    p.add_argument("--program", required=True, help="integer program file (.safetensors)")
    p.add_argument(
        "--onnx", default=None, help="output .onnx path (formats int, int-float, qlinear, qdq)"
    )
    p.add_argument("--out", default=None, help="output folder of NAME.h and NAME.c (format c)")
    p.add_argument("--name", default="model", help="C identifier prefix (format c)")
    p.add_argument(
        "--format",
        choices=("int", "int-float", "qlinear", "qdq", "c"),
        default="int",
        help="int: integer operators only, bit-exact in ONNX Runtime (default); "
        "int-float: the same with each rounding step as float Mul/Add/Floor/Clip where proven "
        "exact (as the torch runtime runs it; faster in ONNX Runtime, still bit-exact); "
        "qlinear: int-float with each conv + requantize as ONNX Runtime's QLinearConv and each "
        "rounding step as DequantizeLinear/QuantizeLinear where proven exact (fastest; x86-64 "
        "ONNX Runtime, which the proofs model); "
        "qdq: QuantizeLinear/DequantizeLinear around float ops (8-bit programs); "
        "c: float-free C99 (NAME.h, NAME.c), bit-exact",
    )

    p = sub.add_parser("demo", help="the whole pipeline on the embedded digits data")
    p.add_argument("--json", default=None, help="write the table as JSON rows")
    p.add_argument("--out", default=None, help="keep checkpoints and programs here")
    p.add_argument("--bits", default="4,4;2,2", help="W,A pairs separated by ';'")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _run_args(ns: argparse.Namespace):
    from .workflow import RunArgs

    fields = RunArgs.__dataclass_fields__
    values = {k: v for k, v in vars(ns).items() if k in fields}
    if values.get("cuda") is None:
        import torch

        values["cuda"] = 0 if torch.cuda.is_available() else -1
    values["progress"] = not ns.no_progress
    if ns.command == "qat":
        values.update(dataclasses.asdict(_qat_recipe(ns)))
    elif ns.command == "sweep":  # the float baseline's; each pair's QAT takes the recipe's
        for key in ("grad_clip", "residual_bits"):
            values[key] = None if values[key] is FROM_RECIPE else values[key]
    return RunArgs(**values)


def _recipe_overrides(ns: argparse.Namespace) -> dict:
    """The recipe fields the command line gave (the rest keep FROM_RECIPE)."""
    from ..qat.recipe import RECIPE_FIELDS

    given = {k: getattr(ns, k) for k in RECIPE_FIELDS}
    if ns.command == "sweep":  # -e, --lr and --wd are the float baseline's there
        given.update(epochs=ns.qat_epochs, lr=ns.qat_lr, weight_decay=ns.qat_wd)
    return {k: v for k, v in given.items() if v is not FROM_RECIPE}


def _qat_recipe(ns: argparse.Namespace):
    from ..qat.recipe import recipe_for

    return dataclasses.replace(recipe_for(ns.w_num_bits, ns.a_num_bits), **_recipe_overrides(ns))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return _dispatch(ns)
    except KeyboardInterrupt:
        print(
            "lsqint: interrupted; the last finished epoch's checkpoint is intact", file=sys.stderr
        )
        return 130
    except (LsqintError, FileNotFoundError) as err:  # bad input: one line, exit 2
        if os.environ.get("LSQINT_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"lsqint {ns.command}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug in lsqint or a library below it
        if os.environ.get("LSQINT_DEBUG"):
            raise
        print(
            f"lsqint {ns.command}: internal error: {type(err).__name__}: {_first_line(err)} "
            "(a bug; rerun with LSQINT_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dispatch(ns: argparse.Namespace) -> int:
    from ..train import init_distributed, shutdown_distributed
    from . import workflow

    if ns.command in ("train", "qat"):
        import torch

        args = _run_args(ns)
        device = torch.device("cpu") if args.cuda < 0 else torch.device("cuda", args.cuda)
        dist = init_distributed(device)
        try:
            fn = workflow.train_float if ns.command == "train" else workflow.train_qat
            result = fn(args, dist)
        finally:
            shutdown_distributed()
        if dist.is_main:
            print(f"best val top-1 {result['best_acc']:.4f}; checkpoint {result['checkpoint']}")
        return 0
    if ns.command == "infer":
        from .infer import infer

        return infer(_run_args(ns), ns.program, ns.checkpoint, ns.runtime, ns.limit, ns.json)
    if ns.command == "sweep":
        from .sweep import parse_pairs, sweep

        sweep(
            _run_args(ns),
            parse_pairs(ns.pairs),
            ns.float_epochs,
            _recipe_overrides(ns),
            ns.lr,
            Path(ns.out),
            ns.float_init,
            ns.runtime,
            ns.reevaluate,
            ns.progressive,
        )
        return 0
    if ns.command == "bench":
        from .bench import bench_all, format_rows, write_json

        result = bench_all(ns.model, ns.device, ns.rounds, ns.no_onnx)
        for key in ("qat_overhead", "int_inference", "onnx_inference"):
            if key in result:
                print(f"\n{key} ({ns.model}, {ns.device})")
                print(format_rows(result[key]))
        print()
        write_json(ns.json, result)
        return 0
    if ns.command == "export":
        from ..intprog.artifact import load

        program = load(ns.program)
        if ns.format == "c":
            if not ns.out:
                raise UsageError("--format c needs --out DIR (the folder for NAME.h and NAME.c)")
            from ..export.c_code import export_c

            info = export_c(program, ns.out, ns.name)
            kinds = sorted(set(info.dsp_kernels.values()))
            print(
                f"wrote {info.header} and {info.source}: weights {info.weight_bytes} bytes "
                f"packed ({info.dsp_weight_bytes} in the Arm DSP kernels' layout), RAM "
                f"{info.arena_bytes} bytes arena + {info.scratch_bytes} bytes scratch "
                f"({info.dsp_scratch_bytes} with the DSP kernels); DSP kernels: "
                f"{', '.join(kinds) or 'none'}"
            )
            return 0
        if not ns.onnx:
            raise UsageError(f"--format {ns.format} needs --onnx PATH")
        if ns.format in ("int", "int-float", "qlinear"):
            from ..export.onnx_int import export_onnx

            size = export_onnx(
                program,
                ns.onnx,
                exact_float=ns.format == "int-float",
                qlinear=ns.format == "qlinear",
            )
        else:
            from ..export.onnx_qdq import export_onnx

            size = export_onnx(program, ns.onnx)
        print(f"wrote {ns.onnx} ({size} bytes, {ns.format} format)")
        return 0
    if ns.command == "demo":
        from .demo import demo

        demo(json_path=ns.json, out=Path(ns.out) if ns.out else None, bits=ns.bits, seed=ns.seed)
        return 0
    raise AssertionError(ns.command)


if __name__ == "__main__":
    sys.exit(main())

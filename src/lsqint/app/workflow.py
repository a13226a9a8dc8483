"""The steps the command line chains: train float, QAT (from a float or a lower-precision QAT
checkpoint, with or without distillation), and save the best checkpoint's integer program. Each
function takes plain arguments, so tests and the demo call them directly. Run folders and models
rebuilt from checkpoints are in ``runs``; evaluation of programs is in ``evaluation``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..data import load_data, make_loader
from ..errors import UsageError
from ..intprog.artifact import save
from ..qat import QuantConfig, calibrate_, freeze_batchnorm_
from ..qat.convert import convert
from ..qat.modules import QuantConv2d, QuantConvBn2d, QuantLinear
from ..train import (
    CheckpointError,
    DistInfo,
    TrainConfig,
    Trainer,
    load_checkpoint,
)
from ..train.checkpoint import check_compatible
from ..train.distill import DistillLoss
from .runs import (
    PROGRAM_FILE,
    build_float_model,
    build_qat_model,
    fit_plain_state_dict,
    holds_batchnorm,
    load_plain_state_dict,
    load_weights,
    model_meta,
    qat_run_dir,
    run_dir,
)


def _device(cuda: int) -> torch.device:
    if cuda is None or cuda < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--cuda {cuda} asked for a GPU but CUDA is not available; pass --cuda -1")
    return torch.device("cuda", cuda)


@dataclass
class RunArgs:
    """Everything `lsqint train` / `lsqint qat` take (the seed project's flag names)."""

    model: str = "resnet20"
    dataset: str = "cifar10"
    epochs: int = 10
    batch_size: int = 128
    test_batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = None
    cuda: int = -1
    amp: bool = False
    w_num_bits: int = 4
    a_num_bits: int = 4
    per_channel: bool = True
    first_last_bits: int | None = 8
    residual_bits: int | None = None
    scale_init: str = "mse"
    bn_aware_epochs: int = 0
    distill: bool | None = False  # None: on when a float teacher is found (the CLI default)
    distill_t: float = 4.0
    distill_alpha: float = 0.5
    teacher: str | None = None
    resume: bool = False
    image_size: int | None = None
    num_classes: int | None = None
    seed: int = 0
    log_dir: str = "runs"
    data_root: str | None = None
    init: str | None = None
    download: bool = False
    workers: int = 2
    max_steps_per_epoch: int | None = None
    progress: bool = True
    save_program: bool = True
    overwrite: bool = False


def digits_args(**overrides) -> RunArgs:
    """RunArgs for the embedded digits data (the demo's settings; tests start from them too)."""
    base = dict(
        model="digits_cnn",
        dataset="digits",
        batch_size=64,
        test_batch_size=512,
        cuda=-1,
        progress=False,
    )
    return RunArgs(**{**base, **overrides})


def _setup(args: RunArgs, dist: DistInfo | None):
    dist = dist or DistInfo()
    device = _device(args.cuda if not dist.enabled or args.cuda < 0 else dist.local_rank)
    torch.manual_seed(args.seed)
    data = load_data(args.dataset, args.data_root, args.image_size, args.download)
    if args.num_classes is not None and args.num_classes < data.spec.num_classes:
        raise UsageError(
            f"--num-classes {args.num_classes} is smaller than the dataset's "
            f"{data.spec.num_classes} classes"
        )
    train = make_loader(
        data.train,
        args.batch_size,
        True,
        device,
        args.seed,
        dist.rank,
        dist.world_size,
        args.workers,
        data.spec,
    )
    val = make_loader(
        data.val,
        args.test_batch_size,
        False,
        device,
        args.seed,
        dist.rank,
        dist.world_size,
        args.workers,
    )
    return dist, device, data, train, val


def _train_config(args: RunArgs, out: Path, meta) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        amp=args.amp,
        out_dir=str(out),
        resume=args.resume,
        log_dir=str(out / "tb"),
        progress=args.progress,
        max_steps_per_epoch=args.max_steps_per_epoch,
        overwrite=args.overwrite,
        meta=meta,
        bn_freeze_epoch=meta.get("bn_aware_epochs") or None,
    )


def train_float(args: RunArgs, dist: DistInfo | None = None) -> dict[str, Any]:
    """`lsqint train`: float training; checkpoints under <log-dir>/<dataset>_<model>/float/."""
    dist, device, data, train, val = _setup(args, dist)
    meta = model_meta(args.model, data, "float", args.dataset, args.num_classes)
    model = build_float_model(meta).to(device).to(memory_format=torch.channels_last)
    out = run_dir(args.log_dir, args.dataset, args.model) / "float"
    if not args.resume and args.init:
        load_weights(model, _float_weights(args.init, args, model), args.init)
    result = Trainer(model, train, val, _train_config(args, out, meta), device, dist).fit()
    result["checkpoint"] = str(out / "best.pt")
    result["model"] = model
    return result


def _load_init(path) -> dict:
    """An lsqint checkpoint, or a plain state_dict (pretrained weights a user downloaded) as a
    float checkpoint whose weights ``_float_weights`` fits to the model."""
    try:
        return load_checkpoint(path)
    except CheckpointError:
        plain = load_plain_state_dict(path) if Path(path).is_file() else None
        if plain is None:
            raise
        return {"meta": {"kind": "float", "plain_state_dict": True}, "model": plain}


def _float_weights(path, args: RunArgs, model, state: dict | None = None) -> dict:
    """The weights of a float checkpoint (or plain state_dict) of ``args.model``, ready for
    ``model`` (``state``: the already loaded file)."""
    state = state if state is not None else _load_init(path)
    meta = state["meta"]
    if meta.get("plain_state_dict"):
        return fit_plain_state_dict(model, state["model"], path)
    if meta.get("kind") != "float":
        raise CheckpointError(
            f"{path} is a {meta.get('kind')} checkpoint; --init needs a float "
            "checkpoint from `lsqint train`"
        )
    check_compatible(meta, path, model=args.model)
    return state["model"]


def default_float_checkpoint(args: RunArgs) -> Path:
    return run_dir(args.log_dir, args.dataset, args.model) / "float" / "best.pt"


def train_qat(args: RunArgs, dist: DistInfo | None = None) -> dict[str, Any]:
    """`lsqint qat`: fold BN, insert quantizers, calibrate on the first batch, train; the best
    checkpoint's integer program is saved next to it.

    ``--init`` is a float checkpoint, or a QAT checkpoint of the same model at other bits
    (progressive initialization, APoT's 32 -> 4 -> 3 -> 2 bits): its trained, BN-folded weights
    and biases are kept, every step size is initialized anew for the new bits."""
    config = QuantConfig(
        weight_bits=args.w_num_bits,
        act_bits=args.a_num_bits,
        per_channel=args.per_channel,
        first_last_bits=args.first_last_bits,
        residual_bits=args.residual_bits,
        scale_init=args.scale_init,
    )
    dist, device, data, train, val = _setup(args, dist)
    meta = model_meta(args.model, data, "qat", args.dataset, args.num_classes, config)
    if args.bn_aware_epochs:
        meta["bn_aware_epochs"] = args.bn_aware_epochs
    float_model = build_float_model(meta)
    init = Path(args.init) if args.init else default_float_checkpoint(args)
    out = qat_run_dir(args, args.w_num_bits, args.a_num_bits)
    # A resumed run distills as it did, from the teacher it had (unless the flags say otherwise).
    last = out / "last.pt"
    saved = load_checkpoint(last)["meta"].get("distill") if args.resume and last.is_file() else None
    distill = args.distill  # None: on when a float teacher is found
    if distill is None and args.resume:
        distill = saved is not None
    init_state = None if args.resume else _load_init(init)
    qat_init = init_state is not None and init_state["meta"].get("kind") == "qat"
    if not args.resume and not qat_init:
        load_weights(float_model, _float_weights(init, args, float_model, init_state), init)
    model = build_qat_model(meta, float_model)
    if not args.resume and qat_init:
        check_compatible(init_state["meta"], init, model=args.model)
        load_qat_weights_(model, folded_qat_weights(init_state, init), init)
    model = model.to(device).to(memory_format=torch.channels_last)
    if not args.resume:
        first_images, _ = next(
            iter(
                make_loader(
                    data.train,
                    args.batch_size,
                    True,
                    device,
                    args.seed + 1,
                    dist.rank,
                    dist.world_size,
                    0,
                    data.spec,
                )
            )
        )
        calibrate_(model, first_images)  # activation step sizes; averaged over ranks
    criterion = None
    teacher_path = Path(args.teacher) if args.teacher else None
    if teacher_path is None and saved is not None:
        teacher_path = Path(saved["teacher"])
    if teacher_path is None:
        teacher_path = default_float_checkpoint(args) if qat_init or args.resume else init
    if distill is None:
        distill = teacher_path.is_file()
        if not distill:
            print(f"[qat] no float teacher at {teacher_path}: no distillation (see --teacher)")
    if distill:
        teacher = build_float_model(meta)
        same = init_state if teacher_path == init else None  # the float --init: loaded already
        load_weights(teacher, _float_weights(teacher_path, args, teacher, same), teacher_path)
        teacher = teacher.to(device).to(memory_format=torch.channels_last)
        criterion = DistillLoss(teacher, args.distill_t, args.distill_alpha)
        meta["distill"] = {
            "teacher": str(teacher_path),
            "temperature": args.distill_t,
            "alpha": args.distill_alpha,
        }
    if not args.resume:
        meta["init"] = str(init)
    if dist.is_main:  # what the recipe and the flags made of this run
        clip = "none" if args.grad_clip is None else f"{args.grad_clip:g}"
        print(
            f"[qat] W{args.w_num_bits}A{args.a_num_bits} from {init}: {args.epochs} epochs, "
            f"lr {args.lr:g}, wd {args.weight_decay:g}, grad clip {clip}, residual stream "
            f"{args.residual_bits or args.a_num_bits} bits, distillation "
            + (f"from {teacher_path}" if distill else "off")
        )
    on_best = _save_program if args.save_program else None
    result = Trainer(
        model,
        train,
        val,
        _train_config(args, out, meta),
        device,
        dist,
        on_best=on_best,
        criterion=criterion,
    ).fit()
    result["checkpoint"] = str(out / "best.pt")
    result["program"] = str(out / PROGRAM_FILE)
    result["model"] = model
    return result


def folded_qat_weights(state: dict, path) -> dict:
    """A QAT checkpoint's state_dict with its BatchNorms folded (saved during BN-aware QAT:
    the model it describes in eval mode, folded)."""
    if not holds_batchnorm(state["model"]):
        return state["model"]
    model = build_qat_model(state["meta"], weights=state["model"])
    load_weights(model, state["model"], path)
    freeze_batchnorm_(model)
    return model.state_dict()


def load_qat_weights_(model: fx.GraphModule, weights: dict, path) -> None:
    """Progressive initialization: copy another QAT model's BN-folded weights and biases into
    ``model`` (same architecture, any bits) and re-initialize the weight step sizes for the new
    bits; activation step sizes stay uninitialized, for calibration on the new grid. A BN-aware
    ``model`` starts equal to the folded one (``QuantConvBn2d.start_from_folded_``): its BN
    statistics come from the calibration batch."""
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)
    }
    with torch.no_grad():
        for name, layer in layers.items():
            bn_aware = isinstance(layer, QuantConvBn2d)
            for key in ("weight", "bias"):
                param = getattr(layer, key)
                source = weights.get(f"{name}.{key}")
                if param is None and not bn_aware:
                    continue
                expected = param.shape if param is not None else (layer.out_channels,)
                if source is None and bn_aware and key == "bias":
                    continue
                if source is None or source.shape != expected:
                    raise CheckpointError(
                        f"QAT checkpoint {path} does not fit this model (layer {name}.{key}); "
                        "pass a QAT checkpoint of the same --model and --num-classes"
                    )
                if not torch.isfinite(source).all():
                    raise CheckpointError(f"QAT checkpoint {path} holds NaN/inf in {name}.{key}")
                if not bn_aware:
                    param.copy_(source)
            if bn_aware:
                layer.start_from_folded_(weights[f"{name}.weight"], weights.get(f"{name}.bias"))
            layer.weight_quantizer.init_from_(layer.weight)


def _save_program(model: fx.GraphModule, out: Path, meta: dict[str, Any]) -> None:
    program = convert(model)
    keys = ("model", "dataset", "num_classes", "image_size", "quant", "lsqint_version")
    program.metadata.update({k: meta[k] for k in keys})
    program.metadata.update(run_id=meta.get("run_id"), epoch=meta.get("epoch"))
    save(program, out / PROGRAM_FILE)

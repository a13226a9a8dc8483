"""`lsqint infer`: integer-only evaluation of a saved program (the seed's q_inference.py)."""

from __future__ import annotations

from pathlib import Path

from ..data import load_data
from ..intprog.artifact import load
from ..train import CheckpointError
from .evaluation import artifact_sizes, compare, images_and_labels, write_json
from .runs import PROGRAM_FILE, load_qat_model, qat_run_dir
from .workflow import RunArgs


def check_same_run(program_meta: dict, ckpt_meta: dict, program_path, ckpt_path) -> None:
    """A program and the checkpoint it is compared with must be the same model: same quant
    config, and (when both record it) the same run and epoch."""
    if program_meta.get("quant") is not None and program_meta["quant"] != ckpt_meta.get("quant"):
        raise CheckpointError(
            f"{ckpt_path} was trained with other quantization settings than {program_path} "
            "(bits or layout differ); pass the checkpoint of the same run with --checkpoint"
        )
    for key in ("run_id", "epoch"):
        if program_meta.get(key) is not None and program_meta[key] != ckpt_meta.get(key):
            raise CheckpointError(
                f"{program_path} and {ckpt_path} come from different runs or epochs ({key} "
                f"{program_meta[key]} vs {ckpt_meta.get(key)}); convert the checkpoint again or "
                "pass the matching pair"
            )


def infer(
    args: RunArgs,
    program_path: str | None,
    checkpoint: str | None,
    runtime: str,
    limit: int | None,
    json_path: str | None,
) -> int:
    if program_path is None:
        program_path = str(qat_run_dir(args, args.w_num_bits, args.a_num_bits) / PROGRAM_FILE)
    path = Path(program_path)
    program = load(path)
    ckpt = Path(checkpoint) if checkpoint else path.parent / "best.pt"
    qat_model = None
    meta = program.metadata
    if ckpt.is_file():
        qat_model, meta = load_qat_model(ckpt)
        check_same_run(program.metadata, meta, path, ckpt)
    dataset = args.dataset if not meta.get("dataset") else meta["dataset"]
    data = load_data(dataset, args.data_root, meta.get("image_size") or args.image_size)
    images, labels = images_and_labels(data.val, limit)
    device = "cpu" if args.cuda is None or args.cuda < 0 else f"cuda:{args.cuda}"
    row = compare(program, qat_model, images, labels, runtime, args.test_batch_size, device)
    row.update(artifact_sizes(program, path))
    row.update(program=str(path), dataset=dataset)
    print(f"program            {path}")
    print(f"images             {row['images']} ({dataset} val)")
    print(
        f"integer top-1      {100 * row['int_acc']:.2f} %   ({runtime} runtime on "
        f"{device}, {row['images_per_s']:.0f} images/s)"
    )
    if qat_model is not None:
        print(
            f"fake-quant top-1   {100 * row['fakequant_acc']:.2f} %   (QAT checkpoint {ckpt}; "
            f"{100 * row['fakequant_f64_acc']:.2f} % evaluated in float64)"
        )
        print(
            f"label agreement    {100 * row['agreement']:.3f} %   ({row['flips']} of "
            f"{row['images']} differ from the float64 evaluation; {row['flips_f32']} from the "
            "float32 one)"
        )
    else:
        print(f"fake-quant top-1   n/a (no QAT checkpoint at {ckpt})")
    print(
        f"artifact           {row['artifact_bytes']} bytes vs {row['float_bytes']} float32 bytes "
        f"({row['float_bytes'] / row['artifact_bytes']:.1f}x smaller)"
    )
    if json_path:
        write_json(json_path, row)
    return 0

"""`lsqint sweep`: one model and dataset, a float baseline and QAT at a list of W/A pairs; for each:
float, fake-quant and integer top-1, label agreement, artifact size. Writes JSON, a Markdown table
and a PNG plot. Resumable: a pair whose row is in the JSON is not redone, and an interrupted pair
resumes from its last checkpoint."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..data import load_data
from ..errors import UsageError
from ..intprog.artifact import load
from ..qat.recipe import progressive_source, recipe_for
from .evaluation import artifact_sizes, compare, float_accuracy, images_and_labels
from .runs import PROGRAM_FILE, load_qat_model, qat_run_dir
from .workflow import RunArgs, default_float_checkpoint, train_float, train_qat

DEFAULT_PAIRS = "8,8 4,4 3,3 2,2 4,6 6,4"


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.replace(";", " ").split():
        try:
            w, a = (int(v) for v in item.split(","))
        except ValueError:
            raise UsageError(f"bad W,A pair {item!r}; write pairs like '8,8 4,4 2,2'") from None
        pairs.append((w, a))
    return pairs


def sweep(
    args: RunArgs,
    pairs: list[tuple[int, int]],
    float_epochs: int,
    qat_overrides: dict[str, Any],
    float_lr: float,
    out: Path,
    float_checkpoint: str | None = None,
    runtime: str = "torch",
    reevaluate: bool = False,
    progressive: bool = True,
) -> list[dict[str, Any]]:
    """Each pair's QAT takes the recipe for its bits (``lsqint.qat.recipe``) with
    ``qat_overrides`` (RunArgs names: epochs, lr, weight_decay, grad_clip, residual_bits) on top.
    ``progressive``: a pair starts from the QAT checkpoint of a pair finished earlier in
    ``pairs`` at most one bit above it on each side (``progressive_source``), else from the
    float model. Distillation (``args.distill``: None = on) always uses the float model as
    teacher."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "sweep.json"
    state = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows: dict[str, dict] = {r["pair"]: r for r in state.get("rows", [])}
    base = replace(args, log_dir=str(out / "runs"))
    ckpt = Path(float_checkpoint) if float_checkpoint else default_float_checkpoint(base)
    if not ckpt.is_file():
        resume = (ckpt.parent / "last.pt").is_file()
        print(f"[sweep] float baseline: {float_epochs} epochs" + (" (resuming)" if resume else ""))
        started = time.time()
        train_float(replace(base, epochs=float_epochs, lr=float_lr, resume=resume))
        state["float_train_s"] = time.time() - started
    data = load_data(args.dataset, args.data_root, args.image_size)
    images, labels = images_and_labels(data.val)
    float_acc = float_accuracy(ckpt, images, labels)
    state.update(
        model=args.model,
        dataset=args.dataset,
        images=len(labels),
        float_checkpoint=str(ckpt),
        float_acc=float_acc,
    )
    distill = args.distill is not False  # None (the CLI default): on; the float model teaches
    finished: list[tuple[int, int]] = []
    for w_bits, a_bits in pairs:
        key = f"W{w_bits}A{a_bits}"
        source = progressive_source((w_bits, a_bits), finished) if progressive else None
        init = ckpt if source is None else qat_run_dir(base, *source) / "best.pt"
        finished.append((w_bits, a_bits))
        qat_dir = qat_run_dir(base, w_bits, a_bits)
        if key in rows:
            if reevaluate:
                print(f"[sweep] {key}: done earlier, evaluated again")
                rows[key].update(
                    _evaluate(
                        qat_dir / "best.pt",
                        qat_dir / PROGRAM_FILE,
                        images,
                        labels,
                        runtime,
                        float_acc,
                    )
                )
            else:
                print(f"[sweep] {key}: done earlier, kept")
            continue
        resume = (qat_dir / "last.pt").is_file()
        recipe = replace(recipe_for(w_bits, a_bits), **qat_overrides)
        print(f"[sweep] {key}: QAT" + (" (resuming)" if resume else ""))
        started = time.time()
        result = train_qat(
            replace(
                base,
                **asdict(recipe),
                w_num_bits=w_bits,
                a_num_bits=a_bits,
                init=str(init),
                distill=distill,
                teacher=args.teacher or str(ckpt),
                resume=resume,
            )
        )
        train_s = time.time() - started
        rows[key] = {
            "pair": key,
            "w_bits": w_bits,
            "a_bits": a_bits,
            **_evaluate(
                Path(result["checkpoint"]),
                Path(result["program"]),
                images,
                labels,
                runtime,
                float_acc,
            ),
            "qat_epochs": recipe.epochs,
            "qat_recipe": asdict(recipe),
            "qat_train_s": train_s,
            "init": str(init),
            "distill": distill,
        }
        state["rows"] = list(rows.values())
        _write(results_path, state)  # after every pair: an interruption loses at most one
    ordered = [rows[f"W{w}A{a}"] for w, a in pairs if f"W{w}A{a}" in rows]
    state["rows"] = ordered
    _write(results_path, state)
    (out / "sweep.md").write_text(markdown_table(ordered, args.model, args.dataset, len(labels)))
    plot(ordered, out / "sweep.png", f"{args.model} on {args.dataset}")
    print(markdown_table(ordered, args.model, args.dataset, len(labels)))
    return ordered


def _evaluate(
    checkpoint: Path, program_path: Path, images, labels, runtime: str, float_acc: float
) -> dict[str, Any]:
    program = load(program_path)
    qat_model, _ = load_qat_model(checkpoint)
    cmp = compare(program, qat_model, images, labels, runtime)
    keys = (
        "fakequant_acc",
        "fakequant_f64_acc",
        "int_acc",
        "agreement",
        "flips",
        "agreement_f32",
        "flips_f32",
    )
    return {
        "float_acc": float_acc,
        **{k: cmp[k] for k in keys},
        **artifact_sizes(program, program_path),
    }


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def markdown_table(rows, model: str, dataset: str, images: int) -> str:
    lines = [
        f"{model} on {dataset} ({images} held-out images); top-1 in %",
        "",
        "| W/A | float | fake-quant | integer | int - float | agreement (f64 / f32) | artifact "
        "| float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| W{r['w_bits']}A{r['a_bits']} | {100 * r['float_acc']:.2f} | "
            f"{100 * r['fakequant_acc']:.2f} | {100 * r['int_acc']:.2f} | "
            f"{100 * (r['int_acc'] - r['float_acc']):+.2f} | {100 * r['agreement']:.2f} / "
            f"{100 * r.get('agreement_f32', r['agreement']):.2f} | "
            f"{r['artifact_bytes'] / 1024:.0f} KiB | {r['float_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    """Accuracy vs bit pair, and accuracy vs artifact size, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["pair"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(rows))
    series = {"float": "float_acc", "fake-quant": "fakequant_acc", "integer": "int_acc"}
    for (name, key), style in zip(series.items(), ("k--", "o-", "s:"), strict=True):
        ax1.plot(x, [100 * r[key] for r in rows], style, label=name)
    ax1.set_xticks(list(x), labels)
    ax1.set_xlabel("weight / activation bits")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    sizes = [r["artifact_bytes"] / 1024 for r in rows]
    ax2.scatter(sizes, [100 * r["int_acc"] for r in rows], label="integer program")
    for size, r in zip(sizes, rows, strict=True):
        ax2.annotate(
            r["pair"], (size, 100 * r["int_acc"]), textcoords="offset points", xytext=(4, 4)
        )
    if rows:
        ax2.axhline(100 * rows[0]["float_acc"], color="k", linestyle="--", label="float")
        ax2.axvline(
            rows[0]["float_bytes"] / 1024, color="gray", linestyle=":", label="float32 weights"
        )
    ax2.set_xscale("log")
    ax2.set_xlabel("artifact size (KiB, log)")
    ax2.set_ylabel("integer top-1 (%)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(
        path, dpi=110, metadata={"Title": title, "Description": "series: " + ", ".join(series)}
    )
    plt.close(fig)

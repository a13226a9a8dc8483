"""End-to-end tests through the command line: train -> qat -> infer, resume, DDP, bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lsqint.app.cli import main
from lsqint.train import load_checkpoint

DIGITS_DATA = [
    "--model",
    "digits_cnn",
    "--dataset",
    "digits",
    "--cuda",
    "-1",
    "--no-progress",
    "-tb",
    "512",
]
DIGITS = [*DIGITS_DATA, "-b", "64"]  # training commands; infer reads DIGITS_DATA only


def lsqint(*args):
    return subprocess.run(
        [sys.executable, "-m", "lsqint", *args], capture_output=True, text=True, timeout=600
    )


def test_train_qat_infer_on_digits(tmp_path, capsys):
    log = ["--log-dir", str(tmp_path)]
    assert main(["train", *DIGITS, *log, "-e", "3", "--lr", "0.05"]) == 0
    run = tmp_path / "digits_digits_cnn"
    ckpt = load_checkpoint(run / "float" / "best.pt")
    assert ckpt["meta"]["kind"] == "float" and ckpt["meta"]["model"] == "digits_cnn"
    metrics = json.loads((run / "float" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["best_acc"] == max(e["val_acc"] for e in metrics["epochs"])
    assert any((run / "float" / "tb").iterdir())  # TensorBoard event file
    # QAT finds the float checkpoint by itself (same model, dataset and --log-dir).
    assert main(["qat", *DIGITS, *log, "-e", "2", "-w", "3", "-a", "3"]) == 0
    qat_dir = run / "w3a3"
    qat = load_checkpoint(qat_dir / "best.pt")
    assert qat["meta"]["kind"] == "qat" and qat["meta"]["quant"]["weight_bits"] == 3
    assert (qat_dir / "best.intprog.safetensors").is_file()
    # Resume continues from last.pt to the new epoch count.
    assert main(["qat", *DIGITS, *log, "-e", "3", "-w", "3", "-a", "3", "--resume"]) == 0
    assert load_checkpoint(qat_dir / "last.pt")["epoch"] == 3
    capsys.readouterr()
    out_json = tmp_path / "infer.json"
    assert main(["infer", *DIGITS_DATA, *log, "-w", "3", "-a", "3", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "integer top-1" in text and "label agreement" in text and "artifact" in text
    row = json.loads(out_json.read_text())
    assert row["images"] == 360 and 0 <= row["int_acc"] <= 1 and row["agreement"] >= 0.99
    assert row["artifact_bytes"] < row["float_bytes"]


def _image_tree(root: Path, classes=3, per_class=(12, 4), size=16):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((size, size, 3), 60 * c, np.uint8) + rng.integers(
                    0, 40, (size, size, 3), dtype=np.uint8
                )
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_train_and_qat_on_an_image_folder_tree(tmp_path):
    data = _image_tree(tmp_path / "tree")
    common = [
        "--model",
        "resnet20",
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--image-size",
        "16",
        "--cuda",
        "-1",
        "--no-progress",
        "-b",
        "8",
        "-tb",
        "8",
        "--workers",
        "0",
        "--log-dir",
        str(tmp_path / "runs"),
    ]
    assert main(["train", *common, "-e", "1"]) == 0
    assert main(["qat", *common, "-e", "1"]) == 0
    run = tmp_path / "runs" / "folder_resnet20"
    assert load_checkpoint(run / "w4a4" / "last.pt")["meta"]["num_classes"] == 3
    assert (run / "w4a4" / "best.intprog.safetensors").is_file()
    # The same tree read as an in-memory CIFAR-style ImageFolder (train/ + val/).
    common[3] = "cifar10"
    assert main(["train", *common, "-e", "1", "--num-classes", "10"]) == 0


def test_killed_run_resumes_to_identical_weights(tmp_path):
    args = [*DIGITS, "--image-size", "16", "-b", "16", "-e", "4", "--lr", "0.05", "--seed", "3"]
    ref = lsqint("train", *args, "--log-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    cmd = [sys.executable, "-m", "lsqint", "train", *args, "--log-dir", str(tmp_path / "killed")]
    _kill_after_epoch(cmd, 1, tmp_path)
    last = tmp_path / "killed" / "digits_digits_cnn" / "float" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 1  # killed after epoch 1
    resumed = lsqint("train", *args, "--log-dir", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "ref" / "digits_digits_cnn" / "float" / "last.pt")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["best_acc"] == b["best_acc"]


def test_resume_with_other_optimizer_flags_is_refused_and_keeps_the_run(tmp_path):
    """--resume with another --lr or --grad-clip would silently mix two runs (the optimizer
    state keeps the old lr, the new clip applies): one-line error, last.pt untouched."""
    args = [*DIGITS, "--image-size", "8", "-b", "32", "--lr", "0.05", "--log-dir", str(tmp_path)]
    assert main(["train", *args, "-e", "1", "--grad-clip", "1"]) == 0
    last = tmp_path / "digits_digits_cnn" / "float" / "last.pt"
    before = last.read_bytes()
    for flags, named in (
        (["--lr", "0.1", "--grad-clip", "1"], "--lr"),
        (["--lr", "0.05"], "--grad-clip"),
    ):
        r = lsqint("train", *args[:-4], *args[-2:], *flags, "-e", "2", "--resume")
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert f"{named} is" in r.stderr and "the run was trained with" in r.stderr
        assert last.read_bytes() == before
    assert main(["train", *args, "-e", "2", "--grad-clip", "1", "--resume"]) == 0
    assert load_checkpoint(last)["epoch"] == 2


_KILLER = """
import os, signal
from lsqint.train import loop

_checkpoint = loop.Trainer._checkpoint


def _checkpoint_then_die(self, improved):
    _checkpoint(self, improved)
    if self.epoch == int(os.environ["LSQINT_TEST_KILL_AFTER_EPOCH"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as hard as a power cut, at a known point


loop.Trainer._checkpoint = _checkpoint_then_die
"""


def _kill_after_epoch(cmd: list[str], epoch: int, tmp_path: Path) -> None:
    """Run ``cmd`` and SIGKILL it right after epoch ``epoch``'s checkpoints are written (a
    sitecustomize in the child patches the trainer: no race with a reader of its output)."""
    hook = tmp_path / "kill_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILLER)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "LSQINT_TEST_KILL_AFTER_EPOCH": str(epoch)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_bn_aware_qat_freezes_on_schedule_and_resumes_to_identical_weights(tmp_path, digits_runs):
    """--bn-aware-epochs 1: epoch 1 trains with live BatchNorm, then BN folds for good; a run
    killed after the fold resumes (folding again before loading) to the same weights."""
    from lsqint.app.runs import holds_batchnorm

    float_ckpt = digits_runs["float"]["checkpoint"]
    args = [*DIGITS, "-e", "3", "-w", "3", "-a", "3", "--lr", "0.01", "--seed", "3"]
    args += ["--bn-aware-epochs", "1", "--init", float_ckpt]
    ref = lsqint("qat", *args, "--log-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    assert "epoch 1: BatchNorm statistics frozen" in ref.stdout
    cmd = [sys.executable, "-m", "lsqint", "qat", *args, "--log-dir", str(tmp_path / "killed")]
    _kill_after_epoch(cmd, 2, tmp_path)
    run = tmp_path / "killed" / "digits_digits_cnn" / "w3a3"
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    resumed = lsqint("qat", *args, "--log-dir", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "ref" / "digits_digits_cnn" / "w3a3" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and not holds_batchnorm(a["model"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["meta"]["bn_aware_epochs"] == 1
    # Whichever epoch was best (BN live or folded), its program is saved and `infer` agrees.
    out_json = tmp_path / "infer.json"
    infer = lsqint(
        "infer",
        *DIGITS_DATA,
        "--log-dir",
        str(tmp_path / "killed"),
        "-w",
        "3",
        "-a",
        "3",
        "--json",
        str(out_json),
    )
    assert infer.returncode == 0, infer.stderr
    assert json.loads(out_json.read_text())["agreement"] == 1.0


def test_torchrun_two_ranks_hold_identical_parameters(tmp_path, digits_runs):
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(tmp_path),
            digits_runs["float"]["checkpoint"],
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    scales = [k for k in rank0 if k.endswith(".scale")]
    assert len(scales) > 5
    run = tmp_path / "digits_digits_cnn" / "w4a4"
    assert (run / "last.pt").is_file()
    # The val top-1 the run printed and chose best.pt by is the whole split's, not rank 0's
    # shard: one process evaluating best.pt on the whole split gets the same figure.
    from lsqint.app.runs import load_qat_model
    from lsqint.data import load_data, make_loader
    from lsqint.train import evaluate

    model, meta = load_qat_model(run / "best.pt")
    val = load_data("digits", None, meta.get("image_size")).val
    whole = evaluate(model, make_loader(val, 256, False, "cpu"), torch.device("cpu"))
    best = load_checkpoint(run / "best.pt")
    assert whole["acc"] == best["best_acc"]


def test_missing_dataset_is_one_line_error(tmp_path):
    r = lsqint(
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        str(tmp_path / "nope"),
        "--cuda",
        "-1",
        "-e",
        "1",
        "--log-dir",
        str(tmp_path),
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "does not exist" in r.stderr and "--data-root" in r.stderr


def test_bits_out_of_range_is_one_line_error(tmp_path, digits_runs):
    r = lsqint("qat", *DIGITS, "-w", "9", "--log-dir", str(digits_runs["root"]))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "weight_bits=9 is out of range" in r.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path, digits_runs):
    r = lsqint(
        "qat",
        "--model",
        "resnet20",
        "--dataset",
        "digits",
        "--cuda",
        "-1",
        "--init",
        digits_runs["float"]["checkpoint"],
        "--log-dir",
        str(tmp_path),
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "model='digits_cnn', not 'resnet20'" in r.stderr


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage" * 10)
    for path, message in ((foreign, "not an lsqint checkpoint"), (corrupt, "corrupted")):
        r = lsqint("qat", *DIGITS, "--init", str(path), "--log-dir", str(tmp_path))
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_nan_loss_stops_cleanly_and_keeps_the_good_checkpoint(tmp_path):
    log = ["--log-dir", str(tmp_path)]
    assert main(["train", *DIGITS, *log, "-e", "1", "--lr", "0.05"]) == 0
    best = tmp_path / "digits_digits_cnn" / "float" / "best.pt"
    before = best.read_bytes()
    r = lsqint("train", *DIGITS, *log, "-e", "2", "--lr", "1e30", "--momentum", "0", "--overwrite")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "loss became nan" in r.stderr.lower() or "loss became inf" in r.stderr.lower()
    assert best.read_bytes() == before


def test_a_new_run_never_replaces_earlier_work_without_overwrite(tmp_path, digits_runs):
    import shutil

    run = tmp_path / "digits_digits_cnn" / "w4a4"
    shutil.copytree(Path(digits_runs["qat"]["checkpoint"]).parent, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = lsqint(
        "qat", *DIGITS, "--log-dir", str(tmp_path), "--per-tensor", "-e", "1",
        "--init", digits_runs["float"]["checkpoint"],
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_infer_refuses_a_checkpoint_of_another_run_or_holding_nan(tmp_path, digits_runs):
    program = digits_runs["qat"]["program"]
    infer = ["infer", "--program", program, "--runtime", "reference", "--limit", "20"]
    r = lsqint(*infer, "--checkpoint", digits_runs["qat8"]["checkpoint"], "--cuda", "-1")
    assert r.returncode == 2 and "other quantization settings" in r.stderr, r.stderr
    state = load_checkpoint(digits_runs["qat"]["checkpoint"])
    next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(state, nan_ckpt)
    r = lsqint(*infer, "--checkpoint", str(nan_ckpt), "--cuda", "-1")
    assert r.returncode == 2 and "NaN" in r.stderr, r.stderr


def test_infer_on_a_lone_program_file(tmp_path, digits_runs, capsys):
    import shutil

    lone = tmp_path / "model.intprog.safetensors"
    shutil.copy(digits_runs["qat"]["program"], lone)  # no best.pt beside it
    args = [
        "infer",
        "--program",
        str(lone),
        "--runtime",
        "reference",
        "--limit",
        "50",
        "--cuda",
        "-1",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fake-quant top-1   n/a" in out and "(digits val)" in out
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["images"] == 50 and row["runtime"] == "reference" and "agreement" not in row


def test_best_checkpoint_and_its_program_carry_the_same_run_and_epoch(digits_runs):
    from lsqint import load

    meta = load_checkpoint(digits_runs["qat"]["checkpoint"])["meta"]
    program = load(digits_runs["qat"]["program"])
    assert len(meta["run_id"]) == 32 and meta["epoch"] >= 1
    assert program.metadata["run_id"] == meta["run_id"]
    assert program.metadata["epoch"] == meta["epoch"]
    other = load_checkpoint(digits_runs["qat8"]["checkpoint"])["meta"]
    assert other["run_id"] != meta["run_id"]


def test_infer_on_the_int8_gemm_runtime_gives_the_torch_runtimes_accuracy(tmp_path, digits_runs):
    """``--runtime torch-int8`` (convolutions as int8 GEMMs) is exact: the same integer top-1 and
    agreement as the float-path torch runtime on the same program."""
    import json

    from lsqint.app.cli import main

    rows = {}
    for runtime in ("torch", "torch-int8"):
        out = tmp_path / f"{runtime}.json"
        args = ["infer", "--program", digits_runs["qat"]["program"], "--runtime", runtime]
        assert main([*args, "--cuda", "-1", "--json", str(out)]) == 0
        rows[runtime] = json.loads(out.read_text())
    assert rows["torch-int8"]["runtime"] == "torch-int8"
    for key in ("int_acc", "agreement", "flips"):
        assert rows["torch-int8"][key] == rows["torch"][key]


def test_training_split_smaller_than_one_batch_trains_on_what_it_has(tmp_path):
    """digits' 1,437 training images with -b 2000: one short batch per epoch, not zero batches
    (which printed train loss 0.0000), and qat calibrates on that batch."""
    log = ["--log-dir", str(tmp_path)]
    assert main(["train", *DIGITS, *log, "-b", "2000", "-e", "1", "--lr", "0.05"]) == 0
    metrics = json.loads((tmp_path / "digits_digits_cnn" / "float" / "metrics.json").read_text())
    assert metrics["epochs"][0]["train_loss"] > 0
    assert main(["qat", *DIGITS, *log, "-b", "2000", "-e", "1", "--no-distill"]) == 0


def test_bad_input_exits_2_and_a_bug_exits_1_as_an_internal_error(monkeypatch, capsys):
    from lsqint.app import workflow
    from lsqint.errors import DatasetError

    def bad_input(*_args, **_kwargs):
        raise DatasetError("no images under /nowhere; pass --data-root")

    monkeypatch.setattr(workflow, "train_float", bad_input)
    assert main(["train", *DIGITS, "-e", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: no images under /nowhere" in err

    def bug(*_args, **_kwargs):
        raise KeyError("lr")

    monkeypatch.setattr(workflow, "train_float", bug)
    assert main(["train", *DIGITS, "-e", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "LSQINT_DEBUG" in err


def test_runtime_typo_is_refused_before_any_work(tmp_path):
    r = lsqint("sweep", *DIGITS, "--runtime", "typo", "--log-dir", str(tmp_path))
    assert r.returncode == 2 and "invalid choice: 'typo'" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing trained


def test_infer_help_lists_only_its_own_flags():
    r = lsqint("infer", "--help")
    assert r.returncode == 0
    for flag in ("--program", "--runtime", "-w", "-tb"):
        assert flag in r.stdout
    for flag in ("--lr", "--resume", "--grad-clip", "--bn-aware-epochs", "--epochs"):
        assert flag not in r.stdout


def test_plain_state_dict_initializes_a_run(tmp_path, digits_runs, capsys):
    """--init with a plain state_dict (as torchvision's downloads): matching keys load, another
    class count leaves the classifier at its initialization, other mismatches are refused."""
    float_ckpt = load_checkpoint(digits_runs["float"]["checkpoint"])
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in float_ckpt["model"].items()}, plain)  # DDP-style
    log = ["--log-dir", str(tmp_path / "runs")]
    args = [*DIGITS, *log, "-e", "1", "--lr", "0.0", "--init", str(plain)]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "digits_digits_cnn" / "float"
    trained = load_checkpoint(run / "last.pt")["model"]
    for key, value in float_ckpt["model"].items():  # lr 0: the parameters are the file's
        if "running_" not in key and "num_batches" not in key:  # BN statistics still update
            assert torch.equal(trained[key], value), key
    head = [k for k in float_ckpt["model"] if k.endswith("weight")][-1]
    smaller = dict(float_ckpt["model"])
    smaller[head] = smaller[head][:5]
    smaller[head.replace("weight", "bias")] = smaller[head.replace("weight", "bias")][:5]
    torch.save(smaller, plain)
    assert main(["train", *args, "--overwrite"]) == 0
    assert "classifier is left at its initialization" in capsys.readouterr().out
    first_conv = next(k for k in float_ckpt["model"] if k.endswith("weight"))
    broken = dict(float_ckpt["model"])
    broken[first_conv] = broken[first_conv][:, :, :1]
    torch.save(broken, plain)
    r = lsqint("train", *args, "--overwrite")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "weight shapes differ" in r.stderr and first_conv in r.stderr

"""Shared benchmark helpers: evidence (command, commit, machine, versions) and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def evidence() -> dict:
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
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved_timings(fns: dict, rounds: int, repeats: int, sync=lambda: None) -> dict:
    """Median seconds per call of each fn, measured round-robin so drift hits all equally."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")

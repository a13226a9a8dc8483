"""The torch runtime's CPU fast path (oneDNN int8 convolutions, C rounding kernels) against its
float paths and the reference, on real images: every trained program given, every image of the
validation split, logits compared with ==, with each one's top-1 and speed.

    python benchmarks/native_exactness.py --data-root ../shared/data/cifar10 \\
        --programs docs/results/cifar10_*/*.intprog.safetensors [--reference-images 500]

The float paths are themselves tested == reference on every test program; the reference (numpy,
~8 images/s here) checks the first --reference-images images of each program directly.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from lsqint import load
from lsqint.app.bench import path_counts, script_result, write_json
from lsqint.app.evaluation import images_and_labels
from lsqint.data.datasets import load_data
from lsqint.runtime import CompiledProgram, run_reference

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--dataset", default="cifar10")
p.add_argument("--data-root", required=True)
p.add_argument("--programs", nargs="+", required=True)
p.add_argument("--reference-images", type=int, default=0)
p.add_argument("--json", default="bench_results/native_exactness.json")
args = p.parse_args()

images, labels = images_and_labels(load_data(args.dataset, args.data_root).val)
images, labels = images.numpy(), labels.numpy()
rows = []
for path in args.programs:
    program = load(path)
    fast, plain = CompiledProgram(program), CompiledProgram(program, cpu_kernels=False)
    timings = {}
    logits = {}
    for name, compiled in (("fast", fast), ("float_paths", plain)):
        start = time.perf_counter()
        logits[name] = compiled(images)
        timings[name] = len(images) / (time.perf_counter() - start)
    n_ref = min(args.reference_images, len(images))
    ref_equal = None
    if n_ref:
        ref_equal = bool(
            np.array_equal(run_reference(program, images[:n_ref]), logits["fast"][:n_ref])
        )
    row = {
        "program": str(Path(path).relative_to(Path.cwd())) if Path(path).is_absolute() else path,
        "images": len(images),
        "fast_equals_float_paths": bool(np.array_equal(logits["fast"], logits["float_paths"])),
        "reference_images": n_ref,
        "fast_equals_reference": ref_equal,
        "top1": float((logits["fast"].argmax(1) == labels).mean() * 100),
        "fast_images_per_s": timings["fast"],
        "float_paths_images_per_s": timings["float_paths"],
        "fast_paths": path_counts(fast),
    }
    rows.append(row)
    print(row, flush=True)
write_json(args.json, script_result("native_exactness", args, rows))

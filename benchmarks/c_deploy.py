"""The generated C on a microcontroller and on this host: flash, RAM, speed, exactness.

    python benchmarks/c_deploy.py [--cifar-root ../shared/data/cifar10] [--json OUT.json]

Programs: digits_cnn trained here (float 25 epochs, then QAT at W8A8 / W4A4 / W2A2, the test
suite's settings) and the CIFAR-10 resnet20 programs committed under docs/results/ (W4A4, W3A3,
W2A2; no W8A8 CIFAR-10 program has been trained yet). For each one:
- Cortex-M4 (arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=soft -Os): flash and static
  RAM of the model's object file, and the int8-weight layout's size for comparison (TFLite
  Micro stores weights one byte each); the firmware run under qemu on real images, logits ==
  reference.
- This host, one thread: images/s of the C compiled with -O3 against the torch runtime.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lsqint.app.bench import format_rows, script_result, write_json
from lsqint.data import load_data
from lsqint.app.evaluation import images_and_labels
from lsqint.export.mcu import build_firmware, model_object_sizes, run_qemu
from lsqint.intprog.artifact import load
from lsqint.runtime import compile_program, run
from lsqint.export.c_host import CompiledC
from lsqint.app.workflow import digits_args, train_float, train_qat

RESULTS = Path("docs/results/cifar10_resnet20_lowbit")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--cifar-root", default="../shared/data/cifar10")
p.add_argument("--host-images", type=int, default=512)
p.add_argument("--qemu-images", type=int, default=8)
p.add_argument("--json", default="bench_results/c_deploy.json")
args = p.parse_args()
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


rows = []
with tempfile.TemporaryDirectory() as tmp:
    for label, program, images in programs(Path(tmp) / "runs"):
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
print(format_rows(rows))
write_json(args.json, script_result("c_deploy", args, rows))

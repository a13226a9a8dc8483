"""Build a program's generated C for an Arm Cortex-M4 and run it under qemu (no board needed).

The firmware is the generated ``model.c`` plus a ``main.c`` that holds a batch of images as
``const`` arrays, runs the model on each and prints the logits through semihosting. It is built
with Debian's bare-metal toolchain (``apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi
qemu-system-arm``) for ``-mcpu=cortex-m4 -mthumb`` with the soft-float ABI, linked with the
toolchain's example startup code and linker script (memory map of qemu's ``mps2-an386`` board:
4 MiB at 0x0, 4 MiB at 0x20000000), and run by ``qemu-system-arm -M mps2-an386 -semihosting``.

Counting instructions: with ``-icount shift=0`` qemu advances virtual time 1 ns per executed
instruction, and the board's FPGAIO COUNTER (a 32-bit register at 0x40028018) counts at 25 MHz of
that time, so one tick is 40 instructions. ``main`` reads it around each ``NAME_run`` and prints
the difference; ``run_qemu(..., count=True)`` returns it. Instructions are a lower bound on a real
Cortex-M4's cycles (loads, taken branches and multiply-accumulates of 64-bit results take more
than one cycle; flash wait states add more), not cycles.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ToolError
from ..intprog.program import IntProgram
from .c_code import export_c

TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
EXAMPLES = Path("/usr/share/doc/gcc-arm-none-eabi/examples")
CFLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft", "-Os", "-std=c99")
COUNTER_ADDRESS = 0x40028018  # mps2-an386 FPGAIO COUNTER: 25 MHz of virtual time
INSTRUCTIONS_PER_TICK = 40  # with -icount shift=0: 1 ns per instruction, 40 ns per tick
MEMORY = """MEMORY
{
  FLASH (rx) : ORIGIN = 0x0, LENGTH = 0x400000
  RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 0x400000
}
"""


class McuToolError(ToolError):
    """The Arm toolchain or qemu is missing, or building/running the firmware failed."""


def missing_tools() -> list[str]:
    """The tools of this module that are not installed (empty when all are)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    for name in ("startup/startup_ARMCM4.S", "ldscripts/gcc.ld"):
        if not (EXAMPLES / name).is_file():
            missing.append(str(EXAMPLES / name))
    return missing


@dataclass
class Firmware:
    elf: Path
    text_bytes: int  # code + const data (weights): flash
    data_bytes: int  # initialized RAM (copied from flash at start)
    bss_bytes: int  # zeroed RAM: the arena, the kernels' scratch, the C library's


def _main_c(name: str, images: np.ndarray, nodes: int) -> str:
    n = images.shape[0]
    size = int(np.prod(images.shape[1:]))
    rows = []
    for image in images.reshape(n, size):
        rows.append("  {" + ",".join(str(int(v)) for v in image) + "}")
    return f"""#include <stdio.h>
#include "{name}.h"

#define COUNTER (*(volatile uint32_t *){COUNTER_ADDRESS:#x})

static const uint8_t images[{n}][{size}] = {{
{("," + chr(10)).join(rows)}
}};

void SystemInit(void) {{}}

#if defined(LQ_PROFILE) && LQ_PROFILE
/* Counter ticks spent in each node of the program, summed over the images. */
static uint32_t node_ticks[{nodes}], last_tick;
void lq_profile(int node)
{{
    uint32_t now = COUNTER;
    node_ticks[node] += now - last_tick;
    last_tick = COUNTER;  /* the hook's own instructions are not counted */
}}
#endif

int main(void)
{{
    static int32_t logits[{name.upper()}_NUM_CLASSES];
    int i, k;
    for (i = 0; i < {n}; i++) {{
        uint32_t start = COUNTER, ticks;
#if defined(LQ_PROFILE) && LQ_PROFILE
        last_tick = start;
#endif
        {name}_run(images[i], logits);
        ticks = COUNTER - start;
        printf("ticks %lu\\n", (unsigned long)ticks);
        printf("logits");
        for (k = 0; k < {name.upper()}_NUM_CLASSES; k++) printf(" %ld", (long)logits[k]);
        printf("\\n");
    }}
#if defined(LQ_PROFILE) && LQ_PROFILE
    for (k = 0; k < {nodes}; k++) printf("node %d %lu\\n", k, (unsigned long)node_ticks[k]);
#endif
    return 0;
}}
"""


def _run(command: list[str], what: str, timeout: float) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise McuToolError(f"{what} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise McuToolError(f"{what} failed: {lines[0]}")
    return done.stdout


def build_firmware(
    program: IntProgram,
    images: np.ndarray,
    out_dir: str | Path,
    name: str = "model",
    opt: str = "-Os",
    portable: bool = False,
    profile: bool = False,
) -> Firmware:
    """Cross-compile ``program`` and a main that classifies ``images`` (uint8, N x C x H x W);
    ``opt``: the optimization flag (``-Os`` for flash, ``-O2`` for speed); ``portable``: build
    the portable C kernels (``-DLQ_PORTABLE``) instead of the Arm DSP extension's;
    ``profile``: also count each node's instructions (``-DLQ_PROFILE``; ``node_instructions``)."""
    out = Path(out_dir)
    info = export_c(program, out, name)
    pixels = np.ascontiguousarray(images, np.uint8)
    (out / "main.c").write_text(_main_c(info.name, pixels, len(program.nodes)))
    defines = (["-DLQ_PORTABLE"] if portable else []) + (["-DLQ_PROFILE=1"] if profile else [])
    return link_firmware([out / "main.c", info.source], out / f"{info.name}.elf", opt, defines)


def link_firmware(sources: list[Path], elf: Path, opt: str = "-Os", defines=()) -> Firmware:
    """Compile and link C ``sources`` (one with ``main``) into a Cortex-M4 firmware ``elf`` for
    qemu's mps2-an386 board: the toolchain's startup code, its linker script with that board's
    memory map, semihosting for ``printf``."""
    missing = missing_tools()
    if missing:
        raise McuToolError(
            f"missing {', '.join(missing)}; install them with `apt-get install "
            "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm`"
        )
    elf = Path(elf)
    script = (EXAMPLES / "ldscripts/gcc.ld").read_text()
    script = re.sub(r"MEMORY\s*\{[^}]*\}", MEMORY, script, count=1)
    (elf.parent / "gcc.ld").write_text(script)
    command = [
        "arm-none-eabi-gcc",
        *(flag for flag in CFLAGS if not flag.startswith("-O")),
        opt,
        *defines,
        "--specs=rdimon.specs",
        "-D__STARTUP_CLEAR_BSS",
        "-D__START=_start",
        "-T",
        str(elf.parent / "gcc.ld"),
        str(EXAMPLES / "startup/startup_ARMCM4.S"),
        *(str(source) for source in sources),
        "-o",
        str(elf),
    ]
    _run(command, "arm-none-eabi-gcc", 300)
    sizes = _run(["arm-none-eabi-size", str(elf)], "arm-none-eabi-size", 60).splitlines()[1]
    text, data, bss = (int(v) for v in sizes.split()[:3])
    return Firmware(elf, text, data, bss)


def model_object_sizes(source: str | Path, portable: bool = False) -> dict[str, int]:
    """Flash and static RAM of the generated model alone: ``source`` compiled for the Cortex-M4
    (``CFLAGS``; ``portable``: the portable kernels and packed weights) into an object file,
    measured by ``arm-none-eabi-size``."""
    source = Path(source)
    obj = source.with_suffix(".portable.o" if portable else ".o")
    flags = [*CFLAGS, *(["-DLQ_PORTABLE"] if portable else [])]
    _run(["arm-none-eabi-gcc", *flags, "-c", str(source), "-o", str(obj)], "compile", 300)
    line = _run(["arm-none-eabi-size", str(obj)], "arm-none-eabi-size", 60).splitlines()[1]
    text, data, bss = (int(v) for v in line.split()[:3])
    return {"flash_bytes": text + data, "ram_bytes": data + bss}


def qemu_output(firmware: Firmware, timeout: float = 600, count: bool = False) -> str:
    """What the firmware printed on qemu's Cortex-M4 board (``count``: ``-icount shift=0``)."""
    command = [
        "qemu-system-arm",
        "-M",
        "mps2-an386",
        "-nographic",
        "-semihosting",
        *(["-icount", "shift=0"] if count else []),
        "-kernel",
        str(firmware.elf),
    ]
    return _run(command, "qemu-system-arm", timeout)


def node_instructions(firmware: Firmware, timeout: float = 600) -> np.ndarray:
    """Instructions executed in each node of the program per image (float64 (nodes,), the mean
    over the firmware's images, to within a counter tick each), from a firmware built with
    ``profile=True``."""
    output = qemu_output(firmware, timeout, count=True)
    images = sum(line.startswith("logits") for line in output.splitlines())
    ticks = [int(line.split()[2]) for line in output.splitlines() if line.startswith("node ")]
    if not ticks or not images:
        raise McuToolError("the firmware printed no node counts: build it with profile=True")
    return np.array(ticks, dtype=np.float64) * INSTRUCTIONS_PER_TICK / images


def run_qemu(firmware: Firmware, timeout: float = 600, count: bool = False):
    """Run the firmware on qemu's Cortex-M4 board; the logits it printed, (N, classes) int32.
    ``count``: run with ``-icount shift=0`` and also return each image's executed instructions
    (int64 (N,), to within one counter tick of 40 instructions)."""
    output = qemu_output(firmware, timeout, count)
    rows = [line.split()[1:] for line in output.splitlines() if line.startswith("logits")]
    if not rows:
        raise McuToolError(f"the firmware printed no logits: {output.strip()[:200]!r}")
    logits = np.array(rows, dtype=np.int64).astype(np.int32)
    if not count:
        return logits
    ticks = [int(line.split()[1]) for line in output.splitlines() if line.startswith("ticks")]
    return logits, np.array(ticks, dtype=np.int64) * INSTRUCTIONS_PER_TICK


def node_macs(program: IntProgram, node) -> int:
    """Multiply-accumulates of one image through ``node`` (a conv2d or linear; else 0)."""
    if node.op not in ("conv2d", "linear"):
        return 0
    per_output = int(np.prod(node.params["weight"].shape[1:]))
    return per_output * int(np.prod(program.tensors[node.output].shape))


def program_macs(program: IntProgram) -> int:
    """Multiply-accumulates of one image through every conv2d and linear of ``program``."""
    return sum(node_macs(program, node) for node in program.nodes)

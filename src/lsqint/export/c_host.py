"""The ``c`` runtime on the host: the generated C (``export.c_code``) compiled by this machine's C
compiler into a shared library and called through ctypes, one image per call.

It exists so that every differential test checks the code a microcontroller would run against
the reference, on the host; the Cortex-M check (``tests/test_c_export.py``) runs the same source
under qemu.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ToolError
from ..intprog.program import IntProgram
from ..toolchain import c_compiler
from .c_code import export_c

ENTRY = "lsqint_model"


class CompiledC:
    """``program`` as a host shared library; ``self(images)`` -> int32 logits (N, classes)."""

    def __init__(self, program: IntProgram, opt: str = "-O2"):
        compiler = c_compiler()
        if compiler is None:
            raise ToolError(
                "the c runtime needs a C compiler (cc or gcc; or set $CC); install one, e.g. "
                "`apt-get install gcc`"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="lsqint-c-"))
        # Removed at exit, not when this object goes: a loaded library stays mapped, and a new
        # file on a freed inode would make dlopen hand back the old library.
        atexit.register(shutil.rmtree, self._dir, True)
        info = export_c(program, self._dir, ENTRY)
        library = self._dir / f"{ENTRY}.so"
        command = [compiler, "-std=c99", opt, "-shared", "-fPIC", "-o", str(library)]
        done = subprocess.run(
            [*command, str(info.source)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
            raise ToolError(f"compiling the generated C failed: {first}")
        self.export = info
        self._lib = ctypes.CDLL(str(library))
        self._run = getattr(self._lib, f"{ENTRY}_run")
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._run.restype = ctypes.c_int
        self._image_bytes = int(np.prod(program.input_spec.shape))
        self._classes = program.num_classes()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        logits = np.zeros((images.shape[0], self._classes), np.int32)
        source, target = images.ctypes.data, logits.ctypes.data
        for i in range(images.shape[0]):
            self._run(source + i * self._image_bytes, target + i * 4 * self._classes)
        return logits


def compile_c(program: IntProgram) -> CompiledC:
    """Built once per program and kept on it (like ``compile_program`` for torch)."""
    cache = program.__dict__.setdefault("_compiled", {})
    if "c" not in cache:
        cache["c"] = CompiledC(program)
    return cache["c"]

"""The torch runtime's CPU fast path: oneDNN's int8 convolution for the accumulators, and the
rounding steps (requantize, add, affine) as small C kernels that run the reference's int64
arithmetic in one pass over memory.

Why: on CPU, a float32 convolution costs 3-4x oneDNN's u8 x s8 -> int32 convolution of the same
shape, and a rounding step in torch is five passes over memory (or float64 where float32 cannot
be proven exact, W8A8's 256-level outputs). Both are exact here by construction or by check:

* the convolution: ``torch.ops.onednn.qconv2d_pointwise`` with input and weight scales 1 and a
  float32 output computes ``float(bias + sum(x * w))`` from an int32 accumulator. Exact when
  (a) the accumulator never saturates: the CPU has VNNI (``vpdpbusd`` adds u8 x s8 products into
  int32 without saturation), read from the CPU's flags, never assumed (without VNNI, see
  ``onednn_int8_available``); (b) every value is below 2^24 in magnitude (``acc_bound``), so
  the float32 conversion is exact; and (c) the layer passes a probe at build time against the
  exact float64 convolution on random and extreme inputs (a guard against a kernel that is wrong
  for the layer's shape; (a) and (b) are the argument);
* the rounding kernels (``native_kernels.c``): int64 arithmetic identical to the reference's,
  applied where |acc * m| + 2^(t-1) < 2^62 (checked per layer).

The C kernels are compiled once per machine and source with the C compiler
``lsqint.toolchain`` finds
(``-O3 -march=native -fopenmp``: on the OpenMP runtime torch loaded; serial without OpenMP) into
``$XDG_CACHE_HOME/lsqint`` (else ``~/.cache/lsqint``); without a compiler, VNNI or oneDNN the
torch runtime keeps its float paths, and ``CompiledProgram.paths`` says which ran where.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..toolchain import c_compiler

SOURCE = Path(__file__).with_name("native_kernels.c")
INT64_SAFE = 1 << 62


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni() -> bool:
    """Will oneDNN's int8 kernels add u8 x s8 products into int32 without saturation? Yes where
    the CPU has AVX-512 VNNI or AVX-VNNI, unless oneDNN is capped below them
    (``ONEDNN_MAX_CPU_ISA``; any cap that does not name VNNI or AMX counts as one)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap and cap != "ALL" and not any(name in cap for name in ("VNNI", "AMX")):
        return False
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def onednn_int8_available() -> bool:
    """oneDNN's int8 convolution in this torch (x86 CPU builds have it) on a CPU where its
    kernels cannot saturate (VNNI). Without VNNI they add pairs of u8 x s8 products in int16
    with saturation (vpmaddubsw); weights within [-64, 64] would keep those pairs exact, but
    oneDNN capped to AVX2 on this project's VNNI machine gave wrong sums on a 1x1 stride-2
    convolution of 4-bit codes (whole output pixels from the wrong input, a few per batch: not
    saturation), so without VNNI the float paths run."""
    try:
        torch.ops.onednn.qconv2d_pointwise  # noqa: B018 (attribute lookup is the check)
        torch.ops.onednn.qconv_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available() and has_vnni()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lsqint"


_FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC"]


def _build(compiler: str, library: Path) -> bool:
    """Compile the kernels into ``library``: with OpenMP where the compiler has it, else serial.
    Built beside the target and renamed, so a concurrent build never loads half a file."""
    library.parent.mkdir(parents=True, exist_ok=True)
    for extra in (["-fopenmp"], []):
        fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        command = [compiler, *_FLAGS, *extra, "-o", partial, str(SOURCE)]
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            os.replace(partial, library)
            return True
        os.unlink(partial)
    return False


@cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None without a working C compiler."""
    compiler = c_compiler()
    if compiler is None or not SOURCE.exists():
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source
        + " ".join(
            [compiler, *_FLAGS, "-fopenmp", platform.machine(), *sorted(cpu_flags())]
        ).encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"native-{key}.so"
    try:
        if not library.exists() and not _build(compiler, library):
            return None
        lib = ctypes.CDLL(str(library))
    except OSError:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for a in ("f32", "u8"):
        for out in ("f32", "u8"):
            getattr(lib, f"requantize_{a}_{out}").argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr]
            getattr(lib, f"requantize_{a}_{out}").argtypes += [i64, i64]
            for b in ("f32", "u8"):
                getattr(lib, f"add_{a}_{b}_{out}").argtypes = [ptr, ptr, ptr] + [i64] * 6
    return lib


_SUFFIX = {torch.float32: "f32", torch.uint8: "u8"}


class Requantize:
    """clamp(floor((x * m[c] + b[c] + 2^(t[c]-1)) / 2^t[c]), lo, hi) per channel, on a tensor in
    channels-last (or (N, C)) layout: requantize (b = 0; x a float32 accumulator) and the affine
    op (x codes, float32 or uint8). Output float32 or uint8 codes."""

    BLOCK = 1024  # elements per tile of the per-channel parameters (whole pixels)

    def __init__(self, lib, m, t, lo: int, hi: int, out_dtype: torch.dtype, b=None):
        self.lib, self.out = lib, _SUFFIX[out_dtype]
        m = torch.tensor(np.array(m, np.int64))
        t = torch.tensor(np.array(t, np.int64))
        b = torch.zeros_like(m) if b is None else torch.tensor(np.array(b, np.int64))
        self.pixels_per_block = max(1, self.BLOCK // len(m))
        tile = self.pixels_per_block
        self.m = m.repeat(tile).contiguous()
        self.t = t.repeat(tile).contiguous()
        self.add = (b + (torch.ones_like(t) << (t - 1))).repeat(tile).contiguous()
        self.lo, self.hi, self.out_dtype = int(lo), int(hi), out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if x.dtype not in _SUFFIX:  # float64/int64 values below 2^24 (checked): exact in float32
            x = x.to(torch.float32)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            out = torch.empty_like(x, dtype=self.out_dtype, memory_format=torch.channels_last)
        else:
            x = x.contiguous()
            out = torch.empty_like(x, dtype=self.out_dtype)
        getattr(self.lib, f"requantize_{_SUFFIX[x.dtype]}_{self.out}")(
            x.data_ptr(), out.data_ptr(), x.numel(), self.pixels_per_block * c,
            self.m.data_ptr(), self.add.data_ptr(), self.t.data_ptr(), self.lo, self.hi,
        )  # fmt: skip
        return out


class Add:
    """clamp(floor((a * m_a + b * m_b + 2^(t-1)) / 2^t), lo, hi) elementwise; inputs float32 or
    uint8 codes of the same shape, output ``out_dtype``."""

    def __init__(self, lib, m_a: int, m_b: int, t: int, lo: int, hi: int, out_dtype):
        self.lib = lib
        self.args = (int(m_a), int(m_b), int(t), int(lo), int(hi))
        self.out_dtype = out_dtype

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = (x if x.dtype in _SUFFIX else x.to(torch.float32) for x in (a, b))
        memory = torch.channels_last if a.dim() == 4 else torch.contiguous_format
        a = a.contiguous(memory_format=memory)
        b = b.contiguous(memory_format=memory)
        out = torch.empty_like(a, dtype=self.out_dtype, memory_format=memory)
        fn = getattr(
            self.lib, f"add_{_SUFFIX[a.dtype]}_{_SUFFIX[b.dtype]}_{_SUFFIX[self.out_dtype]}"
        )
        fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), *self.args)
        return out

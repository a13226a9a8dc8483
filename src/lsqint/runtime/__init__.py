"""Runtimes: a registry name -> ``fn(program, images, **options) -> np.ndarray`` (int32 logits).

``reference`` (numpy int64) defines the semantics; every other runtime must return identical
integers on the same program and input. This registry is the one place that names every
backend that can run a program: the torch runtime (``torch_runtime``) and the exports that have
a host runner (``export.c_host``, ``export.onnx_int``); each is imported when first used, so
running the reference never imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from ..errors import UsageError
from ..intprog.program import IntProgram
from .reference import run_reference

RUNTIMES: dict[str, Callable[..., np.ndarray]] = {}


def register_runtime(name: str):
    def decorate(fn):
        RUNTIMES[name] = fn
        return fn

    return decorate


@register_runtime("reference")
def _reference(program: IntProgram, images, **_options) -> np.ndarray:
    return run_reference(program, np.ascontiguousarray(images))


def compile_program(program: IntProgram, device="cpu", int8_gemm: bool = False):
    """The torch runtime's compiled form of ``program`` on ``device``, built once per program and
    device (exactness proofs, weight conversion) and kept on the program object, so that
    ``run(program, batch, runtime="torch")`` in a loop does not rebuild it every call. Programs
    are not meant to be edited after ``convert``/``load``; one that is must be compiled anew
    (``CompiledProgram(program, device)``). ``int8_gemm``: convolutions as int8 GEMMs
    (``torch._int_mm``; see the torch runtime's docstring)."""
    import torch

    from .torch_runtime import CompiledProgram

    cache = program.__dict__.setdefault("_compiled", {})
    key = (str(torch.device(device)), bool(int8_gemm))
    if key not in cache:
        cache[key] = CompiledProgram(program, device, int8_gemm=bool(int8_gemm))
    return cache[key]


@register_runtime("torch")
def _torch(
    program: IntProgram, images, device: str = "cpu", int8_gemm: bool = False, **_options
) -> np.ndarray:
    return compile_program(program, device, int8_gemm)(images)


@register_runtime("torch-int8")
def _torch_int8(program: IntProgram, images, device: str = "cpu", **_options) -> np.ndarray:
    """The torch runtime with convolutions as int8 GEMMs (``int8_gemm=True``): CUDA's int8
    tensor-core path; exact but slow on CPU (``torch._int_mm`` has no fast CPU kernel there)."""
    return _torch(program, images, device, int8_gemm=True)


@register_runtime("c")
def _c(program: IntProgram, images, **_options) -> np.ndarray:
    from ..export.c_host import compile_c

    return compile_c(program)(images)


@register_runtime("onnx")
def _onnx(
    program: IntProgram, images, exact_float: bool = False, qlinear: bool = False, **_options
) -> np.ndarray:
    """``exact_float=True``: the export's rounding steps as proven-exact float ops;
    ``qlinear=True``: also each conv + requantize as a proven-exact QLinearConv. The session
    (export, proofs, ONNX Runtime's graph optimization: seconds) is kept on the program like
    ``compile_program``'s, so calls in a loop build it once."""
    from ..export.onnx_int import OnnxSession

    cache = program.__dict__.setdefault("_compiled", {})
    key = ("onnx", bool(exact_float), bool(qlinear))
    if key not in cache:
        cache[key] = OnnxSession(program, exact_float, qlinear)
    return cache[key](images)


@register_runtime("onnx-qlinear")
def _onnx_qlinear(program: IntProgram, images, **_options) -> np.ndarray:
    """ONNX Runtime on the qlinear export (QLinearConv / QuantizeLinear where proven exact)."""
    return _onnx(program, images, qlinear=True)


def _as_uint8_images(images, program: IntProgram) -> np.ndarray:
    torch = sys.modules.get("torch")  # a torch tensor can only come from a loaded torch
    is_tensor = torch is not None and torch.is_tensor(images)
    arr = images.detach().cpu().numpy() if is_tensor else np.asarray(images)
    expected = tuple(program.input_spec.shape)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
        raise UsageError(
            f"images must have shape (N, {', '.join(map(str, expected))}), got {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint8:
        raise UsageError(
            f"images must be uint8 pixels, got {arr.dtype}; the integer program "
            "takes raw pixels (no normalization)"
        )
    return arr


def run(program: IntProgram, images, runtime: str = "reference", **options) -> np.ndarray:
    """Run an integer program on uint8 images (N, C, H, W); returns int32 logits (N, classes).

    >>> # logits = lsqint.run(program, images, runtime="torch")        # doctest: +SKIP
    """
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; available: {', '.join(sorted(RUNTIMES))}")
    images = _as_uint8_images(images, program)
    if images.shape[0] == 0:  # every runtime: an empty batch has no logits
        return np.zeros((0, program.num_classes()), np.int32)
    return RUNTIMES[runtime](program, images, **options)


def __getattr__(name: str):
    if name == "CompiledProgram":  # the torch runtime's class, imported (with torch) on demand
        from .torch_runtime import CompiledProgram

        return CompiledProgram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RUNTIMES",
    "CompiledProgram",
    "compile_program",
    "register_runtime",
    "run",
    "run_reference",
]

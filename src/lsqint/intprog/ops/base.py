"""The op unit every backend reads: ``Op`` subclasses register themselves in ``OPS``.

An op is one class holding its schema (param and attribute names, how many tensors it reads),
its verify rule (``infer``: re-derive the output's dtype, shape and code range from the inputs'
specs, refusing anything malformed or able to overflow) and its reference semantics
(``reference``: numpy int64, the definition every runtime must equal with ``==``). Backends keep
their lowerings in tables keyed by op name (``runtime.torch_runtime``, ``export.c_code``,
``export.onnx_int``, ``export.onnx_qdq``); ``tests/test_op_registry.py`` fails when a table lacks
an entry for a registered op and does not say why (``Unsupported``).

This package imports numpy only: loading, verifying and running a program needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import ProgramError
from ..program import Node, TensorSpec

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
ACC_LIMIT = 1 << 31  # |acc| must stay below 2^31 (int32)
MAX_DIM = 1 << 16  # no tensor dimension (channels, height, width) beyond this
MAX_ELEMENTS = 1 << 28  # elements of one image's tensor
MAX_CONCAT = 1024  # inputs of one concat
CODE_DTYPES = ("uint8", "int8")

# (dtype, shape, lo, hi): what ``infer`` derives for a node's output.
Inferred = tuple[str, tuple[int, ...], int, int]

OPS: dict[str, type[Op]] = {}


class Op:
    """One op of the integer program. Subclasses set ``name`` and are registered in ``OPS``."""

    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    attrs: ClassVar[tuple[str, ...]] = ()
    arity: ClassVar[int | None] = 1  # tensors read; None: 1..MAX_CONCAT (concat)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in OPS:
                raise TypeError(f"op {cls.name!r} is registered twice")
            OPS[cls.name] = cls

    @classmethod
    def infer(cls, node: Node, ins: list[TensorSpec]) -> Inferred:
        """The output's (dtype, shape, lo, hi); raises ProgramError for anything unsafe."""
        raise NotImplementedError(cls.name)

    @classmethod
    def reference(cls, node: Node, xs: list[np.ndarray]) -> np.ndarray:
        """The op on int64 values: the semantics every runtime must reproduce exactly."""
        raise NotImplementedError(cls.name)


@dataclass(frozen=True)
class Unsupported:
    """A backend table's entry for an op it cannot lower, with the reason users will read."""

    reason: str


def missing_lowerings(table: dict) -> list[str]:
    """Registered ops a backend's table neither lowers nor marks ``Unsupported``."""
    return sorted(set(OPS) - set(table))


# -- helpers of the verify rules ----------------------------------------------------------------
def fail(node: Node, msg: str):
    raise ProgramError(f"node '{node.name}' ({node.op}): {msg}")


def is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def int_attr(node: Node, key: str, lo=None, hi=None) -> int:
    v = node.attrs[key]
    if not is_int(v):
        fail(node, f"attribute '{key}' must be an integer, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        fail(node, f"attribute '{key}' = {v} outside [{lo}, {hi}]")
    return v


def pair_attr(node: Node, key: str, lo: int, hi: int) -> tuple[int, int]:
    v = node.attrs[key]
    if not isinstance(v, list | tuple) or len(v) != 2 or not all(is_int(x) for x in v):
        fail(node, f"attribute '{key}' must be two integers, got {v!r}")
    if not all(lo <= int(x) <= hi for x in v):
        fail(node, f"attribute '{key}' = {list(v)} outside [{lo}, {hi}]")
    return int(v[0]), int(v[1])


def int_list_attr(node: Node, key: str, lo: int, hi: int) -> list[int]:
    value = node.attrs[key]
    if (
        not isinstance(value, list)
        or not value
        or not all(is_int(v) and lo <= v <= hi for v in value)
    ):
        fail(node, f"attribute '{key}' must be a list of integers in [{lo}, {hi}], got {value!r}")
    return value


def absmax(spec: TensorSpec) -> int:
    return max(abs(spec.qmin), abs(spec.qmax))


def code_range(node: Node, lo: int, hi: int) -> tuple[str, int, int]:
    """dtype of a narrow code tensor in [lo, hi] (int8 when it can be negative)."""
    if not -128 <= lo <= hi <= 255 or (lo < 0 and hi > 127):
        fail(node, f"code range [{lo}, {hi}] does not fit 8 bits")
    return ("int8" if lo < 0 else "uint8"), lo, hi


def out_range(node: Node) -> tuple[str, int, int]:
    """The code range the node's ``lo``/``hi`` attributes declare, with its dtype."""
    return code_range(node, int_attr(node, "lo"), int_attr(node, "hi"))


def channel(p: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel parameter (C,) -> broadcastable along dim 1 of an (N, C, ...) tensor."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))

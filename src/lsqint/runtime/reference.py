"""The reference runtime: numpy, int64, written for clarity. It IS the definition of the semantics.

Each op's semantics is its ``reference`` in ``intprog.ops``; this loop runs them in order. Every
op computes in int64 and stores its result in the tensor's declared dtype; a value that does not
fit the declared dtype is a bug in convert/verify and raises here. Imports numpy only.
"""

from __future__ import annotations

import numpy as np

from ..errors import ProgramError
from ..intprog.ops import OPS
from ..intprog.program import IntProgram, Node


def _store(value: np.ndarray, dtype: str) -> np.ndarray:
    out = value.astype(dtype)
    if not np.array_equal(out.astype(np.int64), value):
        raise OverflowError(f"value does not fit {dtype}: range {value.min()}..{value.max()}")
    return out


def run_node(node: Node, inputs: list[np.ndarray]) -> np.ndarray:
    """One node's output (int64) from its inputs: the op's reference semantics."""
    if node.op not in OPS:
        raise ProgramError(f"node '{node.name}': unknown op {node.op!r}")
    return OPS[node.op].reference(node, inputs)


def run_reference(program: IntProgram, images: np.ndarray) -> np.ndarray:
    """Run ``program`` on uint8 images (N, C, H, W); returns int32 logits (N, classes)."""
    env: dict[str, np.ndarray] = {"input": images}
    for node in program.nodes:
        value = run_node(node, [env[name] for name in node.inputs])
        if node.op == "output":
            return value
        env[node.output] = _store(value, program.tensors[node.output].dtype)
    raise ProgramError("program has no output node")

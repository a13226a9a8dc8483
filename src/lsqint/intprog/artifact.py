"""save/load an IntProgram: safetensors tensors + the graph as JSON metadata (DESIGN section 6).

Weights of b < 8 bits are stored as a dense b-bit stream: code - qmin (an unsigned b-bit number)
per weight, least significant bit first, so 4-bit weights take two per byte and 3-bit weights
eight per three bytes. A SHA-256 over every stored tensor catches corrupted bytes that the
safetensors container itself cannot see. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .program import OPS, IntProgram, Node, TensorSpec
from .verify import ProgramError, verify

FORMAT = "lsqint-intprog"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A program file that is missing, truncated, corrupted, foreign or of another version."""


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed b-bit codes -> a dense uint8 bit stream (LSB first).

    >>> pack_bits(np.array([-8, 7, 0, 1], dtype=np.int8), 4)
    array([240, 152], dtype=uint8)
    """
    offset = codes.astype(np.int64).ravel() + (1 << (bits - 1))  # 0 .. 2^b - 1
    bit_matrix = (offset[:, None] >> np.arange(bits)) & 1
    return np.packbits(bit_matrix.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` signed codes as int8."""
    needed = (count * bits + 7) // 8
    if packed.dtype != np.uint8 or packed.shape != (needed,):
        raise ArtifactError(f"packed weights hold {packed.size} bytes, expected {needed}")
    stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    offset = (stream.astype(np.int64) << np.arange(bits)).sum(axis=1)
    return (offset - (1 << (bits - 1))).astype(np.int8)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save(program: IntProgram, path: str | os.PathLike) -> int:
    """Write ``program`` to ``path`` atomically; returns the file size in bytes."""
    verify(program)
    tensors: dict[str, np.ndarray] = {}
    packing: dict[str, dict] = {}
    for node in program.nodes:
        for key, arr in node.params.items():
            name = f"{node.name}/{key}"
            bits = node.attrs.get("weight_bits", 8) if key == "weight" else 8
            if key == "weight" and bits < 8:
                tensors[name] = pack_bits(arr, bits)
                packing[name] = {"bits": bits, "shape": list(arr.shape)}
            else:
                tensors[name] = np.ascontiguousarray(arr)
    graph = {
        "nodes": [n.to_json() for n in program.nodes],
        "tensors": [s.to_json() for s in program.tensors.values()],
        "metadata": program.metadata,
        "packing": packing,
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "graph": json.dumps(graph),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path.stat().st_size


def _read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata, read without loading the tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: too short to be a program file (truncated?)")
        size = int.from_bytes(head, "little")
        if size > 100_000_000:
            raise ArtifactError(f"{path}: not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{path}: not a safetensors file (unreadable header)") from None
    return header.get("__metadata__") or {}


def load(path: str | os.PathLike) -> IntProgram:
    """Read and fully validate a program written by ``save``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no such program file; create one with `lsqint qat` or "
            "lsqint.save(program, path)"
        )
    meta = _read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: not an lsqint integer program (format "
            f"{meta.get('format')!r}); was it written by lsqint.save?"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(
            f"{path}: program format version {meta.get('format_version')} is not "
            f"supported by this lsqint (reads version {FORMAT_VERSION}); convert again"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: corrupted or truncated program file ({err})") from None
    if _digest(tensors) != meta.get("sha256"):
        raise ArtifactError(f"{path}: checksum mismatch, the file is corrupted; re-save it")
    try:
        graph = json.loads(meta["graph"])
        specs = {d["name"]: TensorSpec.from_json(d) for d in graph["tensors"]}
        nodes = []
        for d in graph["nodes"]:
            if d["op"] not in OPS:
                raise ArtifactError(f"{path}: unknown op {d['op']!r}")
            params = {}
            for key in d["params"]:
                name = f"{d['name']}/{key}"
                if name not in tensors:
                    raise ArtifactError(f"{path}: tensor {name!r} is missing")
                arr = tensors[name]
                if name in graph["packing"]:
                    pk = graph["packing"][name]
                    arr = unpack_bits(arr, int(pk["bits"]), int(np.prod(pk["shape"])))
                    arr = arr.reshape(pk["shape"])
                params[key] = arr
            nodes.append(Node(d["op"], d["name"], d["inputs"], d["output"], d["attrs"], params))
        program = IntProgram(nodes, specs, graph.get("metadata", {}))
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(
            f"{path}: malformed program graph ({type(err).__name__}: {err})"
        ) from None
    try:
        return verify(program)
    except ProgramError as err:
        raise ArtifactError(f"{path}: invalid program: {err}") from None


def float_state_bytes(num_params: int) -> int:
    """Bytes of the same weights as a float32 state_dict would store them (4 per value)."""
    return 4 * num_params


def program_num_params(program: IntProgram) -> int:
    return sum(
        int(n.params[k].size) for n in program.nodes for k in ("weight", "bias") if k in n.params
    )

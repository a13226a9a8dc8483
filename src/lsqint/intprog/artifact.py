"""save/load an IntProgram: safetensors tensors + the graph as JSON metadata (docs/design.md,
section 6).

Weights of b < 8 bits are stored as a dense b-bit stream: code - qmin (an unsigned b-bit number)
per weight, least significant bit first, so 4-bit weights take two per byte and 3-bit weights
eight per three bytes. A SHA-256 over everything that is loaded (the format version, the graph
JSON with its packing table and metadata, and every stored tensor) catches corrupted or edited
bytes that the safetensors container itself cannot see; independently, ``verify`` re-derives every
shape, range and bound from the graph. Loading never unpickles, and every malformed file raises
``ArtifactError`` with one line naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import ArtifactError, ProgramError
from .ops import OPS
from .program import IntProgram, Node, TensorSpec
from .verify import verify

FORMAT = "lsqint-intprog"
# 2: the digest covers the graph JSON too. 3: one vocabulary (the input op's code range is
# lo/hi like every other op's, requantize's shifts are the param 'shift'); 2 is read and renamed.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)


def _upgrade_v2(op: str, attrs: dict, params: dict) -> tuple[dict, dict]:
    """A version-2 node's attrs and params under version 3's names (same integers)."""
    if op == "input" and {"qmin", "qmax"} <= set(attrs):
        attrs = {**attrs, "lo": attrs["qmin"], "hi": attrs["qmax"]}
        del attrs["qmin"], attrs["qmax"]
    if op == "requantize" and "t" in params:
        params = {**params, "shift": params["t"]}
        del params["t"]
    return attrs, params


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


def _digest(tensors: dict[str, np.ndarray], graph_json: str, version: int = FORMAT_VERSION) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{version}\n".encode())
    h.update(graph_json.encode())
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
    graph_json = json.dumps(graph)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "graph": graph_json,
        "sha256": _digest(tensors, graph_json),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # like torch.save's checkpoints, not mkstemp's 0600
    os.replace(tmp, path)
    return path.stat().st_size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return {}
    return meta


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
    readable = {str(v): v for v in READABLE_VERSIONS}
    if meta.get("format_version") not in readable:
        raise ArtifactError(
            f"{path}: program format version {meta.get('format_version')} is not "
            f"supported by this lsqint (reads versions {', '.join(readable)}); convert again"
        )
    version = readable[meta["format_version"]]
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise ArtifactError(f"{path}: corrupted or truncated program file ({err})") from None
    if _digest(tensors, meta.get("graph", ""), version) != meta.get("sha256"):
        raise ArtifactError(
            f"{path}: checksum mismatch, the file is corrupted or was edited; convert again"
        )
    try:
        program = _parse_graph(meta["graph"], tensors, version)
        return verify(program)
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None
    except ProgramError as err:
        raise ArtifactError(f"{path}: invalid program: {err}") from None
    except Exception as err:  # any other shape of malformed graph: one line, never a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ArtifactError(
            f"{path}: malformed program graph ({type(err).__name__}: {first})"
        ) from None


def _parse_graph(
    graph_json: str, tensors: dict[str, np.ndarray], version: int = FORMAT_VERSION
) -> IntProgram:
    graph = json.loads(graph_json)
    if not isinstance(graph, dict):
        raise ArtifactError("malformed program graph: not a JSON object")
    for key, kind in (("nodes", list), ("tensors", list), ("packing", dict)):
        if not isinstance(graph.get(key), kind):
            raise ArtifactError(f"malformed program graph: '{key}' is not a {kind.__name__}")
    specs = {}
    for d in graph["tensors"]:
        spec = TensorSpec.from_json(d)
        if spec.name in specs:
            raise ArtifactError(f"tensor '{spec.name}' is declared twice")
        specs[spec.name] = spec
    packing = graph["packing"]
    used = set()
    nodes = []
    for d in graph["nodes"]:
        if d["op"] not in OPS:
            raise ArtifactError(f"unknown op {d['op']!r}")
        attrs = d["attrs"]
        if not isinstance(attrs, dict) or not isinstance(d["params"], list):
            raise ArtifactError(f"node {d['name']!r}: attrs/params malformed")
        params = {}
        for key in d["params"]:
            name = f"{d['name']}/{key}"
            if name not in tensors:
                raise ArtifactError(f"tensor {name!r} is missing")
            used.add(name)
            arr = tensors[name]
            if name in packing:
                pk = packing[name]
                bits, shape = pk["bits"], pk["shape"]
                if bits != attrs.get("weight_bits") or not 2 <= bits <= 7:
                    raise ArtifactError(f"packing of {name!r}: bits {bits!r} != the node's")
                if not isinstance(shape, list) or not all(
                    isinstance(v, int) and 0 < v <= 1 << 28 for v in shape
                ):
                    raise ArtifactError(f"packing of {name!r}: bad shape {shape!r}")
                arr = unpack_bits(arr, bits, int(np.prod(shape))).reshape(shape)
            params[key] = arr
        if version == 2:
            attrs, params = _upgrade_v2(d["op"], attrs, params)
        nodes.append(Node(d["op"], d["name"], d["inputs"], d["output"], attrs, params))
    unused = (set(tensors) | set(packing)) - used
    if unused:
        raise ArtifactError(f"stored tensors no node reads: {sorted(unused)[:3]}")
    metadata = graph.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ArtifactError("'metadata' is not a JSON object")
    return IntProgram(nodes, specs, metadata)


def float_state_bytes(num_params: int) -> int:
    """Bytes of the same weights as a float32 state_dict would store them (4 per value)."""
    return 4 * num_params


def program_num_params(program: IntProgram) -> int:
    return sum(
        int(n.params[k].size) for n in program.nodes for k in ("weight", "bias") if k in n.params
    )

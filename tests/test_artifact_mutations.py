"""Mutation testing of the program file (issue: a program file that is wrong never runs).

A seeded loop edits a saved program (graph JSON fields: values, types, wiring, shapes; raw bytes;
truncation) and asserts that every edited file either raises ArtifactError at load, or loads and
returns integers == the original's on every runtime. Never a different number, never another
exception type. Edits are tried twice: as a careless or damaged file (digest left as it was) and
as an adversary would (digest recomputed), which leaves verify() alone to catch them.

Re-signed edits skip the stored tensors' values (weights, biases, multipliers) and the fixed-point
constants in the graph (the input's and the add's shift, m_a, m_b): a different value there is a
different valid program, which only the digest can tell apart (the unsigned pass shows it does).
"""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import random_qat_program
from lsqint import QuantConfig
from lsqint.intprog.artifact import ArtifactError, _digest, load, save
from lsqint.runtime import run

SEMANTIC_CONSTANTS = {"shift", "m_a", "m_b"}
RUNTIMES = ("reference", "torch")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mutations")
    out = []
    for name, config, size in (
        ("digits_cnn", QuantConfig(weight_bits=3, act_bits=4), 8),
        ("resnet20", QuantConfig(weight_bits=4, act_bits=3, per_channel=False), 8),
    ):
        _, program, images = random_qat_program(name, config, seed=3, batch=2, image_size=size)
        path = root / f"{name}.intprog.safetensors"
        save(program, path)
        images = images.numpy()
        out.append((path, images, run(program, images, runtime="reference")))
    return out


def _leaves(obj, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*prefix, i))


def _mutated_value(value, rng: random.Random, names: list[str]):
    if isinstance(value, bool):
        return rng.choice([not value, 1, "true", None])
    if isinstance(value, int):
        return rng.choice(
            [value + 1, value - 1, -value, 2 * value, 0, 2**63, 4000, str(value), value + 0.5, None]
        )
    if isinstance(value, float):
        return rng.choice([-value, 0.0, value * 2, "nan", None, float("inf")])
    if isinstance(value, str):
        return rng.choice([*rng.sample(names, min(3, len(names))), "", "x", 35])
    if isinstance(value, list):
        choices = [[], value[:-1], value + value[-1:], {"a": 1}, "list"]
        if value:
            choices.append(list(reversed(value)))
        return rng.choice(choices)
    if isinstance(value, dict):
        return rng.choice([[], {}, None, {**value, "extra": 1}])
    return rng.choice([0, "x", []])


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _mutate(src, dst, rng: random.Random, resign: bool) -> str:
    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    kind = rng.choice(["graph"] * 6 + ["tensor", "bytes", "truncate"])
    if resign and kind == "tensor":
        kind = "graph"
    if kind in ("bytes", "truncate"):
        data = bytearray(src.read_bytes())
        if kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        dst.write_bytes(bytes(data))
        return kind
    original = meta["graph"]
    graph = json.loads(original)
    if kind == "tensor":
        name = rng.choice(sorted(tensors))
        arr = tensors[name].copy()
        if not arr.size:
            kind = "noop"  # nothing to flip
        else:
            flat = arr.reshape(-1)
            flat[rng.randrange(flat.size)] ^= 1
        tensors[name] = arr
    else:
        leaves = [
            (p, v) for p, v in _leaves(graph) if p and not (resign and p[-1] in SEMANTIC_CONSTANTS)
        ]
        path, value = rng.choice(leaves)
        names = [t["name"] for t in graph["tensors"]]
        _set(graph, path, _mutated_value(value, rng, names))
        meta["graph"] = json.dumps(graph)
        kind = "graph:" + "/".join(str(k) for k in path if isinstance(k, str))
        if meta["graph"] == original:  # the edit changed nothing (0 -> 2 * 0)
            kind = "noop"
    if resign:
        meta["sha256"] = _digest(tensors, meta["graph"])
    save_file(tensors, str(dst), metadata=meta)
    return kind


def _mutation_loop(programs, tmp_path, cases: int, seed: int):
    rng = random.Random(seed)
    outcomes = collections.Counter()
    for case in range(cases):
        src, images, expected = programs[case % len(programs)]
        dst = tmp_path / f"m{case}.safetensors"
        resign = case % 2 == 1
        kind = _mutate(src, dst, rng, resign)
        what = f"case {case} ({kind}, {'re-signed' if resign else 'as edited'})"
        signed = "re-signed" if resign else "as edited"
        if kind == "noop" or dst.read_bytes() == src.read_bytes():
            outcomes["unchanged"] += 1  # nothing was edited: any outcome but a crash is fine
            continue
        try:
            program = load(dst)
        except ArtifactError as err:
            assert "\n" not in str(err), what
            outcomes[signed, "rejected"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point: nothing but ArtifactError
            pytest.fail(f"{what}: load raised {type(err).__name__}: {err}")
        for runtime in RUNTIMES:
            try:
                got = run(program, images, runtime=runtime)
            except Exception as err:  # noqa: BLE001
                pytest.fail(f"{what}: loaded, then {runtime} raised {type(err).__name__}: {err}")
            assert np.array_equal(got, expected), f"{what}: loaded and {runtime} differs"
        outcomes[signed, "identical"] += 1
    return outcomes


def test_mutated_program_files_are_rejected_or_identical(programs, tmp_path):
    outcomes = _mutation_loop(programs, tmp_path, cases=60, seed=0)
    print(dict(outcomes))
    # Every case ended in one of the two allowed outcomes (the loop fails on anything else).
    # Edits left unsigned are caught by the digest; among re-signed edits, which the digest
    # cannot see, verify's re-derivation must catch most, and the harmless rest must still run.
    assert outcomes["as edited", "identical"] == 0
    assert outcomes["re-signed", "rejected"] >= 10
    assert outcomes["re-signed", "identical"] >= 1


@pytest.mark.slow
def test_mutated_program_files_many_seeds(programs, tmp_path):
    outcomes = _mutation_loop(programs, tmp_path, cases=1200, seed=1)
    print(dict(outcomes))
    assert outcomes["as edited", "identical"] == 0
    assert outcomes["re-signed", "rejected"] >= 200

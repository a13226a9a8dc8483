"""The op registry: every backend's table covers every registered op (a lowering, or
Unsupported with a reason), the schema is the one verify enforces, and the IR layer imports
neither torch nor a backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lsqint.intprog.ops import OPS, Op, Unsupported, missing_lowerings
from lsqint.intprog.program import Node, TensorSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "lsqint"


def _backend_tables():
    from lsqint.export import c_code, onnx_int, onnx_qdq
    from lsqint.runtime import torch_runtime

    return {
        "torch": torch_runtime.LOWERINGS,
        "c": c_code.LOWERINGS,
        "onnx-int": onnx_int.LOWERINGS,
        "onnx-qdq": onnx_qdq.LOWERINGS,
    }


def test_every_backend_table_covers_every_op():
    for backend, table in _backend_tables().items():
        assert missing_lowerings(table) == [], f"{backend} says nothing about these ops"
        assert set(table) <= set(OPS), f"{backend} lowers ops the registry does not know"
        for op, lower in table.items():
            assert callable(lower) or (isinstance(lower, Unsupported) and lower.reason), (
                f"{backend}: {op} is neither a lowering nor Unsupported with a reason"
            )


def test_missing_lowerings_names_the_ops_a_table_forgets():
    from lsqint.export import c_code

    table = dict(c_code.LOWERINGS)
    del table["lut"]
    assert missing_lowerings(table) == ["lut"]


def test_qlinear_steps_are_registered_ops():
    from lsqint.export.onnx_int import QLINEAR_STEPS

    assert set(QLINEAR_STEPS) <= set(OPS)


def test_every_op_defines_its_verify_rule_and_semantics():
    for name, op in OPS.items():
        assert issubclass(op, Op) and op.name == name
        if name != "output":  # the output marker computes nothing verify must infer
            assert op.infer.__func__ is not Op.infer.__func__, f"{name} has no verify rule"
        assert op.reference.__func__ is not Op.reference.__func__, f"{name} has no semantics"


def test_a_second_op_of_one_name_is_refused():
    with pytest.raises(TypeError, match="registered twice"):

        class Duplicate(Op):  # noqa: F841
            name = "add"


def test_unsupported_op_in_a_backend_says_why():
    """The QDQ export marks lut Unsupported: exporting a program with one names the reason."""
    from lsqint.errors import ExportError, LsqintError
    from lsqint.export.onnx_qdq import LOWERINGS

    assert isinstance(LOWERINGS["lut"], Unsupported)
    assert "--format int" in LOWERINGS["lut"].reason
    assert issubclass(ExportError, LsqintError)


def test_input_and_affine_are_one_rule():
    """The input op is the affine op on pixels: the same reference on the same integers."""
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    params = {"a": np.array([3, -5, 7], np.int64), "b": np.array([100, -9, 0], np.int64)}
    attrs = {"shift": 4, "lo": -8, "hi": 7}
    y_in = OPS["input"].reference(Node("input", "i", ["input"], "y", attrs, params), [x])
    y_aff = OPS["affine"].reference(Node("affine", "a", ["x"], "y", attrs, params), [x])
    assert np.array_equal(y_in, y_aff)
    expected = np.clip(
        (x.astype(np.int64) * params["a"].reshape(1, 3, 1, 1) + params["b"].reshape(1, 3, 1, 1) + 8)
        >> 4,
        -8,
        7,
    )
    assert np.array_equal(y_in, expected)


def test_verify_reads_the_schema_from_the_registry():
    """A node whose attrs differ from its op's schema is refused, naming both sets."""
    from lsqint.intprog import ProgramError
    from lsqint.intprog.ops.base import fail

    node = Node("flatten", "f", ["x"], "y", {"bogus": 1})
    spec = TensorSpec("x", "uint8", (2, 3, 3), 0, 15)
    assert OPS["flatten"].infer(node, [spec])[1] == (18,)
    with pytest.raises(ProgramError, match="node 'f' \\(flatten\\): boom"):
        fail(node, "boom")


# -- layering -----------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Absolute names of the lsqint modules (and top-level packages) a file imports."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _files(*parts: str) -> list[Path]:
    return sorted((SRC.joinpath(*parts)).rglob("*.py"))


def test_the_ir_layer_imports_numpy_only():
    allowed_roots = {"numpy", "safetensors", "lsqint"}
    for path in _files("intprog") + [SRC / "errors.py"]:
        for name in _imports(path):
            root = name.split(".")[0]
            if root == "lsqint":
                assert name.startswith(("lsqint.intprog", "lsqint.errors")), (
                    f"{path.name} imports {name}: the IR sits below everything else"
                )
            else:
                assert root in allowed_roots or root in sys.stdlib_module_names, (
                    f"{path.name} imports {name}"
                )


def test_runtimes_and_exporters_do_not_import_each_other():
    for path in _files("export"):
        assert not any(n.startswith("lsqint.runtime") for n in _imports(path)), path.name
    for path in _files("runtime"):
        if path.name == "__init__.py":
            continue  # the registry names every backend that can run a program
        assert not any(n.startswith("lsqint.export") for n in _imports(path)), path.name


def test_loading_and_running_a_program_never_imports_torch(tmp_path):
    program = sorted((SRC.parents[1] / "docs" / "results").rglob("*.intprog.safetensors"))[0]
    code = (
        "import sys, numpy as np, lsqint\n"
        f"p = lsqint.load({str(program)!r})\n"
        "x = np.zeros((1, *p.input_spec.shape), np.uint8)\n"
        "lsqint.run(p, x)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_cli_help_answers_without_torch():
    code = (
        "import sys\nfrom lsqint.app.cli import build_parser\n"
        "build_parser().format_help()\nprint('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

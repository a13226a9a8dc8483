"""The test setup itself: a missing optional dependency fails here, not as silent skips."""

import importlib.util
import os

import pytest


def test_onnx_extras_are_installed():
    """Without onnx/onnxruntime every ONNX exactness test skips; that is a broken setup."""
    if os.environ.get("LSQINT_NO_ONNX") == "1":
        pytest.skip("LSQINT_NO_ONNX=1: running without the ONNX extras on purpose")
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    assert not missing, (
        f"{', '.join(missing)} not installed, so the ONNX exactness tests were skipped: "
        "pip install -e '.[dev,onnx]' (or set LSQINT_NO_ONNX=1 to run without them)"
    )

"""`lsqint bench` runs end to end on a small model and writes what it printed as JSON."""

import json

import pytest

from lsqint.app.bench import format_rows, int_inference, qat_overhead
from lsqint.app.cli import main
from lsqint.runtime import run_reference


def test_bench_functions_measure_every_variant():
    rows = qat_overhead("digits_cnn", batch=16, rounds=1, repeats=1, image_size=8)
    assert [r["variant"] for r in rows][:2] == ["float", "lsqint"]
    rows = int_inference(
        "digits_cnn",
        batch=16,
        bits_list=(4,),
        rounds=1,
        reference_images=2,
        image_size=8,
        int8_gemm=True,
    )
    assert [r["bits"] for r in rows] == ["W4A4"]
    assert "int8-gemm" in rows[0]["torch_int8_paths"]  # the variant really ran int8 GEMMs
    assert "W4A4" in format_rows(rows)


def test_bench_refuses_to_time_a_runtime_that_is_not_exact(monkeypatch):
    """A speed is only reported for a runtime that returned the reference's integers."""
    from lsqint.app import bench

    def wrong_reference(program, images):
        return run_reference(program, images) + 1

    monkeypatch.setattr(bench, "run_reference", wrong_reference)
    with pytest.raises(AssertionError, match="differs from the reference"):
        int_inference(
            "digits_cnn",
            batch=8,
            bits_list=(4,),
            rounds=1,
            reference_images=2,
            image_size=8,
            int8_gemm=False,
        )


@pytest.mark.slow  # ONNX Runtime sessions of every export flavour (~45 s on 2 cores)
def test_bench_command_writes_json(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "digits_cnn", "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"qat_overhead", "int_inference", "onnx_inference", "evidence"} <= set(result)
    assert result["evidence"]["commit"]
    rows = result["onnx_inference"]
    speeds = ("ort_float32", "ort_qdq_w8a8", "ort_int", "ort_int_float", "ort_qlinear", "torch_int")
    assert all(f"{k}_images_per_s" in r for r in rows for k in speeds)
    assert [r["program"] for r in rows] == ["W4A4", "W8A8"]

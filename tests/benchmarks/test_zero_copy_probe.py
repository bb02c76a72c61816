"""The zero-copy probe stays runnable: its smoke mode on the CPU."""

import json

import pytest

from benchmarks import zero_copy_probe


@pytest.mark.slow
def test_zero_copy_probe_runs_its_three_paths_in_smoke_mode_on_the_cpu(tmp_path):
    """Triton's interpreter here (tests/conftest.py); the mapped host memory itself only on a GPU."""
    report = zero_copy_probe.main(["--smoke", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path / "z.json")])
    assert [run["experts"] for run in report["runs"]] == [1, 2, 4]
    for run in report["runs"]:
        assert run["zero_copy_max_difference"] == 0
        assert run["in_memory_us"] > 0 and run["zero_copy_us"] > 0 and run["copy_then_kernels_us"] > 0
    assert json.loads((tmp_path / "z.json").read_text())["row_bytes"] == report["row_bytes"]

"""`moeserve-bench` against the real stack: benchmark jobs through the queue, JSON and a PNG written."""

import json

import pytest

from cli import benchmark

pytestmark = pytest.mark.integration


def test_the_command_line_runs_a_benchmark_through_the_queue(stack, tmp_path, capsys):
    assert benchmark.main(["--url", stack.url, "--iterations", "1", "--out", str(tmp_path)]) == 0
    (json_path,), (png_path,) = tmp_path.glob("*.json"), tmp_path.glob("*.png")
    (run,) = json.loads(json_path.read_text())["runs"]
    assert run["benchmark_type"] == "standard" and run["iterations"] == 1 and run["avg_tokens_per_second"] > 0
    assert all(prompt["memory_used_gb"] > 0 for prompt in run["test_prompts"])
    assert stack.http.get(f"/jobs/{run['job_id']}").json()["kind"] == "benchmark"
    assert png_path.stat().st_size > 1000 and png_path.read_bytes().startswith(b"\x89PNG")
    assert "standard" in capsys.readouterr().out

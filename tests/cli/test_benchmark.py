"""The benchmark command line against a scripted service (the real one: tests/integration/test_benchmark_cli.py)."""

import json

import httpx
import pytest

from cli import benchmark
from shared.schemas import BenchmarkPrompt, BenchmarkResponse


def _report(test_type: str, speeds: list[float]) -> BenchmarkResponse:
    prompts = [
        BenchmarkPrompt(prompt_length=10 * (i + 1), output_length=8, tokens_per_second=s, memory_used_gb=0.5)
        for i, s in enumerate(speeds)
    ]
    return BenchmarkResponse(
        benchmark_type=test_type,
        iterations=len(speeds),
        avg_tokens_per_second=sum(speeds) / 2,
        min_tokens_per_second=min(speeds),
        max_tokens_per_second=max(speeds),
        p95_tokens_per_second=max(speeds),
        avg_memory_usage_gb=0.5,
        test_prompts=prompts,
    )


class ScriptedService:
    """Accepts one benchmark job and reports its progress over two polls, then its result."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.polls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            if self.refuse:
                return httpx.Response(429, json={"error": {"message": "the queue is full", "type": "queue_full_error"}})
            assert request.headers["prefer"] == "respond-async" and json.loads(request.content)["iterations"] == 2
            return httpx.Response(202, json={"id": "b1", "status": "queued", "location": "/jobs/b1"})
        self.polls += 1
        job = {
            "id": "b1",
            "kind": "benchmark",
            "created_at": "2026-12-02T00:00:00Z",
            "progress": f"{self.polls}/2",
            "status": "running" if self.polls < 2 else "succeeded",
        }
        if self.polls >= 2:
            job["result"] = _report("standard", [10.0, 12.0]).model_dump()
        return httpx.Response(200, json=job)


def test_a_run_is_submitted_polled_and_written_as_json_and_png(tmp_path, monkeypatch, capsys):
    service = ScriptedService()
    real_client = httpx.Client
    monkeypatch.setattr(
        benchmark.httpx, "Client", lambda **kwargs: real_client(transport=httpx.MockTransport(service), **kwargs)
    )
    monkeypatch.setattr(benchmark.time, "sleep", lambda _: None)
    assert benchmark.main(["--iterations", "2", "--out", str(tmp_path)]) == 0
    (json_path,), (png_path,) = tmp_path.glob("*.json"), tmp_path.glob("*.png")
    written = json.loads(json_path.read_text())
    assert written["runs"][0]["job_id"] == "b1" and written["runs"][0]["avg_tokens_per_second"] == 11.0
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = capsys.readouterr().out
    assert "standard" in out and "11.00" in out and service.polls == 2


def test_a_refused_run_exits_with_the_service_s_message(tmp_path, monkeypatch, capsys):
    real_client = httpx.Client
    monkeypatch.setattr(
        benchmark.httpx,
        "Client",
        lambda **kwargs: real_client(transport=httpx.MockTransport(ScriptedService(refuse=True)), **kwargs),
    )
    assert benchmark.main(["--iterations", "2", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "429" in err and "the queue is full" in err
    assert not list(tmp_path.glob("*"))


def test_the_table_has_one_row_per_run():
    runs = [
        benchmark.BenchmarkRun("a", _report("standard", [5.0, 7.0]), 1.5),
        benchmark.BenchmarkRun("b", _report("memory", [3.0, 4.0]), 2.0),
    ]
    lines = benchmark.table(runs).splitlines()
    assert len(lines) == 4 and lines[2].startswith("standard") and lines[3].startswith("memory")


@pytest.mark.parametrize("bad", [["--type", "nope"], ["--iterations", "x"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit):
        benchmark.main(bad)

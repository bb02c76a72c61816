"""`moeserve-bench`: batch benchmark runs through the service's queue, with a progress bar, a table, JSON and
a plot.

    moeserve-bench --type standard --type memory --iterations 8 --out bench-results

Each run is a `POST /benchmark` job submitted asynchronously and polled (`GET /jobs/{id}`, whose `progress`
drives the bar), so it runs on whichever worker takes it, exactly like any other job.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from shared.schemas import BenchmarkResponse, JobStatus, JobView

TEST_TYPES = ("standard", "stress", "memory")


class BenchmarkFailed(RuntimeError):
    """The service refused the run, or its job ended without a report."""


@dataclass(frozen=True)
class BenchmarkRun:
    job_id: str
    report: BenchmarkResponse
    seconds: float


def run_benchmark(client: httpx.Client, test_type: str, iterations: int, poll_s: float = 0.5) -> BenchmarkRun:
    started = time.perf_counter()
    response = client.post(
        "/benchmark", json={"test_type": test_type, "iterations": iterations}, headers={"Prefer": "respond-async"}
    )
    if response.status_code != 202:
        raise BenchmarkFailed(f"{test_type}: the service answered {response.status_code}: {_message(response)}")
    job_id = response.json()["id"]
    with tqdm(total=iterations, desc=test_type, unit="prompt") as bar:
        while True:
            job = JobView.model_validate(client.get(f"/jobs/{job_id}").raise_for_status().json())
            done = int(job.progress.split("/")[0]) if job.progress else 0
            bar.update(done - bar.n)
            if job.status.is_terminal:
                break
            time.sleep(poll_s)
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        reason = job.error.message if job.error else job.status.value
        raise BenchmarkFailed(f"{test_type}: job {job_id} ended {job.status.value}: {reason}")
    return BenchmarkRun(job_id, BenchmarkResponse.model_validate(job.result), time.perf_counter() - started)


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def table(runs: list[BenchmarkRun]) -> str:
    header = ("type", "iterations", "avg tok/s", "min", "max", "p95", "avg memory GB", "seconds")
    rows = [
        (
            run.report.benchmark_type,
            str(run.report.iterations),
            f"{run.report.avg_tokens_per_second:.2f}",
            f"{run.report.min_tokens_per_second:.2f}",
            f"{run.report.max_tokens_per_second:.2f}",
            f"{run.report.p95_tokens_per_second:.2f}",
            f"{run.report.avg_memory_usage_gb:.3f}",
            f"{run.seconds:.1f}",
        )
        for run in runs
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def plot(runs: list[BenchmarkRun], path: Path) -> None:
    """Tokens/s per iteration of each run, and memory against prompt size."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    from matplotlib import pyplot

    figure, (speed, memory) = pyplot.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        prompts = run.report.test_prompts
        speed.plot(
            range(1, len(prompts) + 1),
            [p.tokens_per_second for p in prompts],
            marker="o",
            label=run.report.benchmark_type,
        )
        memory.scatter(
            [p.prompt_length for p in prompts], [p.memory_used_gb for p in prompts], label=run.report.benchmark_type
        )
    speed.set(title="decode speed per iteration", xlabel="iteration", ylabel="tokens/s")
    memory.set(title="memory per prompt size", xlabel="prompt tokens", ylabel="GB")
    for axes in (speed, memory):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=TEST_TYPES,
        help="a benchmark suite to run (repeat for several); default standard",
    )
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--api-key", default=None, help="sent as a bearer token when the service wants one")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"), help="folder for the JSON and PNG")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per HTTP request")
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    runs = []
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout_s) as client:
        for test_type in args.types or ["standard"]:
            try:
                runs.append(run_benchmark(client, test_type, args.iterations))
            except (BenchmarkFailed, httpx.HTTPError) as error:
                sys.stderr.write(f"moeserve-bench: {error}\n")
                return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"benchmark-{stamp}.json", args.out / f"benchmark-{stamp}.png"
    record: dict[str, Any] = {
        "url": args.url,
        "runs": [{"job_id": r.job_id, "seconds": r.seconds, **r.report.model_dump()} for r in runs],
    }
    json_path.write_text(json.dumps(record, indent=2))
    plot(runs, png_path)
    sys.stdout.write(f"{table(runs)}\n\nwrote {json_path} and {png_path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

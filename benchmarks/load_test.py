"""A bounded load test through the real stack: many concurrent submissions, every one accounted for.

N clients submit at once (`POST /inference`, asynchronously, 1-token jobs); each gets 202 (its job then
polled to its end) or 429 (the queue is full). Meanwhile `/health` is polled. Reports the counts, whether any
job was lost or ran twice (every accepted job ends `succeeded` after exactly one attempt, with one terminal
event), and `/health`'s latency under the load, p50/p99.

    python -m benchmarks.load_test [--clients 200] [--out benchmarks/results/load_test.json]

Needs Redis at REDIS_URL; starts its own API and worker (`LocalStack`).
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.local_stack import LocalStack
from worker.benchmark_job import percentile

RESULTS = Path(__file__).parent / "results"


@dataclass
class LoadReport:
    clients: int
    accepted: int = 0
    refused_429: int = 0
    other_status: dict[str, int] = field(default_factory=dict)
    succeeded: int = 0
    not_succeeded: dict[str, int] = field(default_factory=dict)  # accepted jobs that ended otherwise
    rerun: int = 0  # accepted jobs that took more than one attempt
    terminal_events_not_one: int = 0
    health_checks: int = 0
    health_5xx: int = 0
    health_ms_p50: float = 0.0
    health_ms_p99: float = 0.0
    seconds: float = 0.0

    @property
    def all_accounted_for(self) -> bool:
        return (
            self.accepted + self.refused_429 == self.clients
            and self.succeeded == self.accepted
            and not (self.other_status or self.not_succeeded or self.rerun or self.terminal_events_not_one)
        )


async def _submit(http: httpx.AsyncClient, index: int) -> tuple[int, str | None]:
    response = await http.post(
        "/inference",
        json={"prompt": f"Say {index}.", "max_tokens": 1, "temperature": 0},
        headers={"Prefer": "respond-async"},
    )
    return response.status_code, response.json().get("id") if response.status_code == 202 else None


async def _until_ended(http: httpx.AsyncClient, job_ids: list[str], timeout_s: float) -> list[dict]:
    """Every job once it has ended (or as it is at the timeout), polled one at a time: a poller per job would
    take the CPU from the worker it waits for."""
    deadline, ended, pending = time.monotonic() + timeout_s, {}, list(job_ids)
    while pending:
        for job_id in pending:
            job = (await http.get(f"/jobs/{job_id}")).json()
            if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                ended[job_id] = job
        pending = [job_id for job_id in pending if job_id not in ended]
        await asyncio.sleep(0.5)
    return [ended[job_id] for job_id in job_ids]


async def _watch_health(http: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float], codes: list[int]):
    while not stop.is_set():
        started = time.perf_counter()
        response = await http.get("/health")
        latencies.append((time.perf_counter() - started) * 1000)
        codes.append(response.status_code)
        await asyncio.sleep(0.05)


async def run_load(stack: LocalStack, clients: int, timeout_s: float = 300) -> LoadReport:
    report = LoadReport(clients=clients)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as http:
        stop, latencies, codes = asyncio.Event(), [], []
        watcher = asyncio.create_task(_watch_health(http, stop, latencies, codes))
        submitted = await asyncio.gather(*(_submit(http, index) for index in range(clients)))
        job_ids = [job_id for status, job_id in submitted if job_id is not None]
        for status, _ in submitted:
            if status == 202:
                report.accepted += 1
            elif status == 429:
                report.refused_429 += 1
            else:
                report.other_status[str(status)] = report.other_status.get(str(status), 0) + 1
        jobs = await _until_ended(http, job_ids, timeout_s)
        stop.set()
        await watcher
    for job in jobs:
        if job["status"] == "succeeded":
            report.succeeded += 1
        else:
            report.not_succeeded[job["status"]] = report.not_succeeded.get(job["status"], 0) + 1
        report.rerun += job["attempts"] != 1
        events = stack.redis.xrange(f"{stack.prefix}:job:{job['id']}:events")
        report.terminal_events_not_one += sum(fields["type"] != "token" for _, fields in events) != 1
    report.health_checks = len(latencies)
    report.health_5xx = sum(code >= 500 and code != 503 for code in codes)
    report.health_ms_p50 = round(statistics.median(latencies), 2)
    report.health_ms_p99 = round(percentile(latencies, 0.99), 2)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_test.json")
    args = parser.parse_args()
    stack = LocalStack(f"load-{uuid.uuid4().hex[:8]}", Path(tempfile.mkdtemp(prefix="moeserve-load-")))
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        report = asyncio.run(run_load(stack, args.clients))
    finally:
        stack.close()
    for name, value in asdict(report).items():
        print(f"| {name:<24} | {value!s:>12} |")
    print(f"| {'all_accounted_for':<24} | {report.all_accounted_for!s:>12} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "all_accounted_for": report.all_accounted_for}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

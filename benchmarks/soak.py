"""A bounded soak of the real stack: mixed traffic in every dialect for a while, with the faults operators see.

`--clients` clients loop until `--minutes` are up, each taking the request kinds in turn: the native API
waited for, submitted asynchronously and polled, and streamed; OpenAI chat completions plain and streamed;
Anthropic messages plain and streamed. Meanwhile the worker is SIGKILLed (at a third and at two thirds of the
time) and started again, as its supervisor would, and Redis (a server of its own, with an append-only file)
is killed and started again on that file at half time. Before Redis is killed the clients hold off for a
moment, so that every job the API accepted is on disk (the file is synced once a second).

It tallies every request's outcome by kind (HTTP status, or a transport failure), then checks every job
record the run left: each ended exactly once (one terminal event in its stream; for a stream the client saw
its end), none is still queued or running. The API's and the worker's RSS are sampled every 2 s.

    python -m benchmarks.soak --minutes 10           # writes results/soak.json
    python -m benchmarks.soak --minutes 1 --out ...  # what `make test` runs (tests/integration/test_soak.py)

Starts its own Redis server, API and worker (`LocalStack`); nothing else needs to run.
"""

import argparse
import asyncio
import contextlib
import json
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from benchmarks.local_stack import LocalStack, RedisServer
from shared.redis_keys import RedisKeys

RESULTS = Path(__file__).parent / "results"
ASYNC = {"Prefer": "respond-async"}
ENDED = ("succeeded", "failed", "cancelled")
#: The request kinds, in the order each client takes them.
KINDS = ("native", "native-async", "native-stream", "openai", "openai-stream", "anthropic", "anthropic-stream")
#: Outcomes that are the service doing its job under these faults: an answer, a full queue, no worker or no
#: Redis for a moment (503). Anything else (500s, dropped connections) counts against the run.
EXPECTED = {"200", "202", "429", "503"}


@dataclass
class SoakReport:
    minutes: float
    clients: int
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> outcome -> count
    requests: int = 0
    unexpected: int = 0
    jobs: int = 0
    jobs_not_ended: int = 0
    jobs_terminal_events_not_one: int = 0
    jobs_running_at_end: int = 0
    worker_kills: int = 0
    redis_restarts: int = 0
    rss_mb: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> first, max, last

    @property
    def all_accounted_for(self) -> bool:
        return not (
            self.unexpected or self.jobs_not_ended or self.jobs_terminal_events_not_one or self.jobs_running_at_end
        )


def _body(kind: str, index: int, model: str) -> tuple[str, dict, dict]:
    """(path, JSON body, headers) of request `index` of `kind`: short answers, so that many complete."""
    prompt = f"Name a colour, then the number {index}."
    messages = [{"role": "user", "content": prompt}]
    if kind.startswith("native"):
        body = {"prompt": prompt, "max_tokens": 8, "stream": kind == "native-stream"}
        return "/inference", body, ASYNC if kind == "native-async" else {}
    if kind.startswith("openai"):
        body = {"model": model, "messages": messages, "max_tokens": 8, "stream": kind.endswith("stream")}
        return "/v1/chat/completions", body, {}
    body = {"model": model, "messages": messages, "max_tokens": 8, "stream": kind.endswith("stream")}
    return "/v1/messages", body, {}


async def _one(http: httpx.AsyncClient, kind: str, index: int, model: str) -> str:
    """One request to its end (a stream read through, an async job polled until it ended): its outcome."""
    path, body, headers = _body(kind, index, model)
    try:
        if body.get("stream"):
            async with http.stream("POST", path, json=body, headers=headers) as response:
                async for _ in response.aiter_lines():
                    pass
                return str(response.status_code)
        response = await http.post(path, json=body, headers=headers)
        if response.status_code == 202 and kind == "native-async":
            job_id = response.json()["id"]
            while True:  # polled through outages too: the job must end whatever happened meanwhile
                await asyncio.sleep(0.5)
                try:
                    job = await http.get(f"/jobs/{job_id}")
                except httpx.TransportError:
                    continue
                if job.status_code == 200 and job.json()["status"] in ENDED:
                    break
        return str(response.status_code)
    except httpx.TransportError as error:
        return f"transport:{type(error).__name__}"


async def _client(
    http: httpx.AsyncClient, number: int, until: float, go: asyncio.Event, tally: dict, model: str
) -> None:
    index = number
    while time.monotonic() < until:
        await go.wait()
        kind = KINDS[index % len(KINDS)]
        outcome = await _one(http, kind, index, model)
        tally.setdefault(kind, Counter())[outcome] += 1
        index += 1
        if outcome in ("429", "503"):
            await asyncio.sleep(0.5)  # as a client with backoff would


class Faults:
    """Kills the worker and Redis at their times, from a thread (they block), and samples RSS."""

    def __init__(self, stack: LocalStack, server: RedisServer, minutes: float, go: asyncio.Event, loop):
        self.stack, self.server, self.go, self.loop = stack, server, go, loop
        seconds = minutes * 60
        self.plan = sorted([(seconds / 3, "worker"), (seconds / 2, "redis"), (2 * seconds / 3, "worker")])
        self.worker_kills = self.redis_restarts = 0
        self.rss: dict[str, list[float]] = {"api": [], "worker": []}

    def run(self, started: float, until: float) -> None:
        plan = list(self.plan)
        while time.monotonic() < until:
            self._sample()
            if plan and time.monotonic() - started >= plan[0][0]:
                self._inject(plan.pop(0)[1])
            time.sleep(2)

    def _inject(self, what: str) -> None:
        if what == "worker":
            worker = self.stack.processes[-1]  # the latest worker
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            self.stack.start_worker(name=f"worker-{self.worker_kills + 1}")
            self.worker_kills += 1
            return
        self.loop.call_soon_threadsafe(self.go.clear)  # hold the clients: what was accepted reaches the disk
        time.sleep(1.5)
        self.server.kill()
        self.loop.call_soon_threadsafe(self.go.set)  # they meet the outage (503) for a few seconds
        time.sleep(4)
        self.server.start()
        self.redis_restarts += 1

    def _sample(self) -> None:
        for name, process in (("api", self.stack.processes[0]), ("worker", self.stack.processes[-1])):
            with contextlib.suppress(psutil.NoSuchProcess):  # between a kill and the next start
                self.rss[name].append(psutil.Process(process.pid).memory_info().rss / 2**20)


async def _traffic(stack: LocalStack, server: RedisServer, minutes: float, clients: int) -> tuple[dict, Faults]:
    tally: dict[str, Counter] = {}
    go = asyncio.Event()
    go.set()
    faults = Faults(stack, server, minutes, go, asyncio.get_running_loop())
    started = time.monotonic()
    until = started + minutes * 60
    thread = threading.Thread(target=faults.run, args=(started, until), daemon=True)
    thread.start()
    async with httpx.AsyncClient(base_url=stack.url, timeout=180) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]  # the name the service answers to
        await asyncio.gather(*(_client(http, number, until, go, tally, model) for number in range(clients)))
    thread.join()
    return tally, faults


def _settle(stack: LocalStack, timeout_s: float = 120) -> None:
    """Until no job is queued or running (the last requests' jobs finish, recovery re-runs the killed ones)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = [stack.redis.hget(key, "status") for key in _job_keys(stack)]
        if not any(status in ("queued", "running") for status in statuses):
            return
        time.sleep(1)


def _job_keys(stack: LocalStack) -> list[str]:
    """Every job record (not the events and cancel keys beside each)."""
    prefix = RedisKeys(stack.prefix).job("")
    return [key for key in stack.redis.scan_iter(f"{prefix}*") if ":" not in key[len(prefix) :]]


def run_soak(stack: LocalStack, server: RedisServer, minutes: float, clients: int) -> SoakReport:
    tally, faults = asyncio.run(_traffic(stack, server, minutes, clients))
    _settle(stack)
    report = SoakReport(minutes=minutes, clients=clients)
    report.outcomes = {kind: dict(counts) for kind, counts in sorted(tally.items())}
    report.requests = sum(sum(counts.values()) for counts in tally.values())
    report.unexpected = sum(n for counts in tally.values() for outcome, n in counts.items() if outcome not in EXPECTED)
    for key in _job_keys(stack):
        job_id = key.rsplit(":", 1)[1]
        report.jobs += 1
        report.jobs_not_ended += stack.redis.hget(key, "status") not in ENDED
        report.jobs_terminal_events_not_one += stack.terminal_events(job_id) != 1
    report.jobs_running_at_end = stack.redis.scard(RedisKeys(stack.prefix).running_jobs())
    report.worker_kills, report.redis_restarts = faults.worker_kills, faults.redis_restarts
    report.rss_mb = {
        name: {"first": round(s[0]), "max": round(max(s)), "last": round(s[-1])} for name, s in faults.rss.items() if s
    }
    return report


def soak(minutes: float, clients: int, folder: Path, **settings: str) -> SoakReport:
    server = RedisServer(folder / "redis")
    server.start()
    stack = LocalStack(f"soak-{uuid.uuid4().hex[:8]}", folder, REDIS_URL=server.url, **settings)
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        return run_soak(stack, server, minutes, clients)
    finally:
        stack.close()
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="moeserve-soak-"))
    # A killed worker's job is taken over once its heartbeat is 3 s stale (the default waits longer).
    report = soak(args.minutes, args.clients, folder, HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_STALE_S="3")
    for name, value in asdict(report).items():
        print(f"| {name:<30} | {json.dumps(value)} |")
    print(f"| {'all_accounted_for':<30} | {report.all_accounted_for} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "all_accounted_for": report.all_accounted_for}, indent=2))
    print(f"# wrote {args.out}; logs in {folder}")


if __name__ == "__main__":
    main()

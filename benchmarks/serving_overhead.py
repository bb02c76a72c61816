"""What the queue costs: the same prompts through (a) the engine in this process and (b) the full
HTTP -> Redis -> Celery worker path, interleaved so that machine noise hits both alike.

Prints a table and writes JSON. Targets: tok/s ratio b/a >= 0.95; for 1-token jobs the latency the service
adds over the model's own generation time, p50 <= 5 ms; the time to first token a streamed
`/v1/chat/completions` adds over the engine's own, p50 <= 10 ms. Beside them, the machine's unit for such
latency: an idle process's round trip to another through Redis.

    python -m benchmarks.serving_overhead [--rounds 3] [--max-tokens 64] [--latency-jobs 30]

Needs Redis at REDIS_URL (`make bench` starts one if none answers); starts its own API and worker.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from benchmarks.local_stack import LocalStack
from shared.schemas import GenerationParams
from worker.benchmark_job import STANDARD_PROMPTS, percentile
from worker.engine.base import SilentControl
from worker.runtime import build_engine

RESULTS = Path(__file__).parent / "results"
TTFT_MESSAGES = [{"role": "user", "content": "Say hello."}]

# A second process that sends back through Redis whatever it is sent.
ECHO = """
import sys, redis
client = redis.Redis.from_url(sys.argv[1])
while (message := client.brpop(sys.argv[2])[1]) != b"stop":
    client.lpush(sys.argv[3], message)
"""


def streamed_chat_ttft(stack: LocalStack, model: str, max_tokens: int) -> tuple[float, str]:
    """Request sent -> first chunk with text, through `/v1/chat/completions`, and the job's id; the stream is
    read to its end."""
    body = {"model": model, "messages": TTFT_MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    first, job_id = None, ""
    started = time.perf_counter()
    with stack.http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                job_id = chunk["id"].removeprefix("chatcmpl-")
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
    assert first is not None and job_id, "the stream had no text"
    return first, job_id


def ttft_added_ms(stack: LocalStack, ttft_s: float, job_id: str) -> float:
    """What the service added to a streamed job's time to first text: the client's wait less the engine's own,
    from the worker's claim to its first text (the times the job's record holds). Timing the engine in this
    process instead would compare two processes whose prefill speeds differ by more than the target."""
    record = stack.job(job_id)
    engine_s = float(record["first_token_at"]) - float(record["started_at"])
    return (ttft_s - engine_s) * 1000


def redis_round_trips_ms(redis_url: str, prefix: str, idle_s: float, count: int) -> list[float]:
    """A message from this process through Redis to another and back, each after `idle_s` idle, as the API and
    the worker are between 1-token jobs: one hand-off between processes on this machine, the unit the queue's
    added latency is made of (a 1-token job makes several in a row)."""
    inbox, outbox = f"{prefix}:echo:in", f"{prefix}:echo:out"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, redis_url, inbox, outbox])
    client = redis.Redis.from_url(redis_url)
    try:
        client.lpush(inbox, b"warm-up")
        client.brpop([outbox], timeout=30)
        round_trips = []
        for _ in range(count):
            time.sleep(idle_s)
            started = time.perf_counter()
            client.lpush(inbox, b"ping")
            client.brpop([outbox], timeout=30)
            round_trips.append((time.perf_counter() - started) * 1000)
        return round_trips
    finally:
        client.lpush(inbox, b"stop")
        echo.wait(timeout=30)
        client.delete(inbox, outbox)


def latency_breakdown(stack: LocalStack, spans: list[tuple[float, float]]) -> dict[str, float]:
    """Where a 1-token job's added latency goes, p50 of each leg (ms), from the times its job record holds:
    request sent -> record written (HTTP, validation, admission), -> claimed by the worker (Celery's delivery),
    -> ended, less the model's own time (the worker around the engine), -> response received (the API's wake-up
    on the job's stream, the HTTP answer). Jobs are matched to requests by order; all run on this machine's clock.
    """
    records = []
    for key in stack.redis.scan_iter(f"{stack.prefix}:job:*"):
        if key.count(":") == 2 and stack.redis.type(key) == "hash":
            record = stack.redis.hgetall(key)
            if json.loads(record["params"]).get("max_tokens") == 1 and record.get("result"):
                records.append(record)
    records.sort(key=lambda record: float(record["created_at"]))
    legs: dict[str, list[float]] = {
        "to_record": [],
        "queue_delivery": [],
        "worker_around_engine": [],
        "to_response": [],
    }
    for (sent, received), record in zip(spans, records[-len(spans) :], strict=True):
        created, claimed, ended = (float(record[name]) for name in ("created_at", "started_at", "finished_at"))
        engine_s = json.loads(record["result"])["generation_time"]
        legs["to_record"].append(created - sent)
        legs["queue_delivery"].append(claimed - created)
        legs["worker_around_engine"].append(ended - claimed - engine_s)
        legs["to_response"].append(received - ended)
    return {f"{leg}_ms_p50": round(statistics.median(values) * 1000, 2) for leg, values in legs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--latency-jobs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_overhead.json")
    args = parser.parse_args()

    engine = build_engine()
    engine.load()
    stack = LocalStack(f"bench-{uuid.uuid4().hex[:8]}", Path(tempfile.mkdtemp(prefix="moeserve-bench-")))
    try:
        stack.start_api()
        stack.start_worker()
        stack.wait_healthy()
        direct_tokens = direct_time = http_tokens = http_time = 0.0
        for _ in range(args.rounds):
            for prompt in STANDARD_PROMPTS:
                params = GenerationParams(prompt=prompt, max_tokens=args.max_tokens, temperature=0.0)
                started = time.perf_counter()
                outcome = engine.generate(params, SilentControl())
                direct_time += time.perf_counter() - started
                direct_tokens += outcome.tokens_generated

                started = time.perf_counter()
                response = stack.http.post(
                    "/inference", json={"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
                )
                http_time += time.perf_counter() - started
                response.raise_for_status()
                http_tokens += response.json()["tokens_generated"]

        added_ms, spans, engine_s = [], [], []
        for _ in range(args.latency_jobs):
            sent_at, started = time.time(), time.perf_counter()
            response = stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0})
            wall = time.perf_counter() - started
            response.raise_for_status()
            engine_s.append(response.json()["generation_time"])
            added_ms.append((wall - engine_s[-1]) * 1000)
            spans.append((sent_at, sent_at + wall))
        breakdown = latency_breakdown(stack, spans)
        round_trip_ms = redis_round_trips_ms(
            stack.redis_url, stack.prefix, idle_s=statistics.median(engine_s), count=args.latency_jobs
        )

        ttft_added = [
            ttft_added_ms(stack, *streamed_chat_ttft(stack, engine.model_name, max_tokens=4))
            for _ in range(args.latency_jobs)
        ]
    finally:
        stack.close()

    direct_tps, http_tps = direct_tokens / direct_time, http_tokens / http_time
    report = {
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "model": engine.model_name,
        "device": engine.device,
        "dtype": engine.dtype,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "engine_tokens_per_second": round(direct_tps, 2),
        "http_tokens_per_second": round(http_tps, 2),
        "ratio_http_over_engine": round(http_tps / direct_tps, 4),
        "one_token_jobs": args.latency_jobs,
        "added_latency_ms_p50": round(statistics.median(added_ms), 2),
        "added_latency_ms_p95": round(percentile(added_ms, 0.95), 2),
        "added_latency_breakdown": breakdown,
        "idle_redis_round_trip_ms_p50": round(statistics.median(round_trip_ms), 3),
        "added_latency_in_idle_round_trips": round(statistics.median(added_ms) / statistics.median(round_trip_ms), 1),
        "ttft_jobs": args.latency_jobs,
        "ttft_added_ms_p50": round(statistics.median(ttft_added), 2),
        "ttft_added_ms_p95": round(percentile(ttft_added, 0.95), 2),
        "targets": {"ratio_http_over_engine": ">= 0.95", "added_latency_ms_p50": "<= 5", "ttft_added_ms_p50": "<= 10"},
    }
    rows = [
        ("engine in-process, tok/s", f"{direct_tps:.2f}", ""),
        ("HTTP -> Redis -> worker, tok/s", f"{http_tps:.2f}", ""),
        ("ratio (b/a)", f"{report['ratio_http_over_engine']:.3f}", ">= 0.95"),
        ("added latency p50, 1-token job (ms)", f"{report['added_latency_ms_p50']:.2f}", "<= 5"),
        ("added latency p95, 1-token job (ms)", f"{report['added_latency_ms_p95']:.2f}", ""),
        *((f"  of which {leg.removesuffix('_ms_p50')}, p50 (ms)", f"{ms:.2f}", "") for leg, ms in breakdown.items()),
        ("idle Redis round trip, p50 (ms)", f"{report['idle_redis_round_trip_ms_p50']:.2f}", ""),
        ("added latency p50 / that round trip", f"{report['added_latency_in_idle_round_trips']:.1f}", ""),
        ("TTFT added p50, streamed /v1/chat (ms)", f"{report['ttft_added_ms_p50']:.2f}", "<= 10"),
        ("TTFT added p95, streamed /v1/chat (ms)", f"{report['ttft_added_ms_p95']:.2f}", ""),
    ]
    print(
        f"\nserving overhead: {engine.model_name} on {engine.device} ({engine.dtype}), "
        f"{args.rounds} rounds x {len(STANDARD_PROMPTS)} prompts x {args.max_tokens} tokens"
    )
    print(f"| {'measure':<38} | {'value':>9} | {'target':<8} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 10}|")
    for name, value, target in rows:
        print(f"| {name:<38} | {value:>9} | {target:<8} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

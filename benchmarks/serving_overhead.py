"""What the queue costs: the same prompts through (a) the engine in this process and (b) the full
HTTP -> Redis -> Celery worker path, interleaved so that machine noise hits both alike.

Prints a table and writes JSON. Targets (MISSION.md): tok/s ratio b/a >= 0.95; for 1-token jobs the
latency the service adds over the model's own generation time, p50 <= 5 ms; the time to first token a
streamed `/v1/chat/completions` adds over the engine's own, p50 <= 10 ms.

    python -m benchmarks.serving_overhead [--rounds 3] [--max-tokens 64] [--latency-jobs 30]

Needs Redis at REDIS_URL (`make bench` starts one if none answers); starts its own API and worker.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.local_stack import LocalStack
from shared.schemas import GenerationParams
from worker.benchmark_job import STANDARD_PROMPTS, percentile
from worker.engine.base import SilentControl
from worker.runtime import build_engine

RESULTS = Path(__file__).parent / "results"
TTFT_MESSAGES = [{"role": "user", "content": "Say hello."}]


class FirstTextClock:
    """A control that notes when the first text arrives."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first_text_s: float | None = None

    def emit(self, text: str) -> None:
        if self.first_text_s is None:
            self.first_text_s = time.perf_counter() - self.started

    def stop_reason(self) -> None:
        return None


def engine_ttft_s(engine, max_tokens: int) -> float:
    clock = FirstTextClock()
    engine.generate(GenerationParams(messages=TTFT_MESSAGES, max_tokens=max_tokens, temperature=0.0), clock)
    return clock.first_text_s


def streamed_chat_ttft_s(stack: LocalStack, model: str, max_tokens: int) -> float:
    """Request sent -> first chunk with text, through `/v1/chat/completions`; the stream is read to its end."""
    body = {"model": model, "messages": TTFT_MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    first = None
    started = time.perf_counter()
    with stack.http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line.removeprefix("data: "))["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter() - started
    return first


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

        added_ms, spans = [], []
        for _ in range(args.latency_jobs):
            sent_at, started = time.time(), time.perf_counter()
            response = stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0})
            wall = time.perf_counter() - started
            response.raise_for_status()
            added_ms.append((wall - response.json()["generation_time"]) * 1000)
            spans.append((sent_at, sent_at + wall))
        breakdown = latency_breakdown(stack, spans)

        ttft_added_ms = []
        for _ in range(args.latency_jobs):
            engine_s = engine_ttft_s(engine, max_tokens=4)
            ttft_added_ms.append((streamed_chat_ttft_s(stack, engine.model_name, max_tokens=4) - engine_s) * 1000)
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
        "ttft_jobs": args.latency_jobs,
        "ttft_added_ms_p50": round(statistics.median(ttft_added_ms), 2),
        "ttft_added_ms_p95": round(percentile(ttft_added_ms, 0.95), 2),
        "targets": {"ratio_http_over_engine": ">= 0.95", "added_latency_ms_p50": "<= 5", "ttft_added_ms_p50": "<= 10"},
    }
    rows = [
        ("engine in-process, tok/s", f"{direct_tps:.2f}", ""),
        ("HTTP -> Redis -> worker, tok/s", f"{http_tps:.2f}", ""),
        ("ratio (b/a)", f"{report['ratio_http_over_engine']:.3f}", ">= 0.95"),
        ("added latency p50, 1-token job (ms)", f"{report['added_latency_ms_p50']:.2f}", "<= 5"),
        ("added latency p95, 1-token job (ms)", f"{report['added_latency_ms_p95']:.2f}", ""),
        *((f"  of which {leg.removesuffix('_ms_p50')}, p50 (ms)", f"{ms:.2f}", "") for leg, ms in breakdown.items()),
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

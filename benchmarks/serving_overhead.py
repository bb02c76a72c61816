"""What the queue costs: the same prompts through (a) the engine in this process and (b) the full
HTTP -> Redis -> Celery worker path, interleaved so that machine noise hits both alike.

Prints a table and writes JSON. Targets (MISSION.md): tok/s ratio b/a >= 0.95; for 1-token jobs the
latency the service adds over the model's own generation time, p50 <= 5 ms.

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

        added_ms = []
        for _ in range(args.latency_jobs):
            started = time.perf_counter()
            response = stack.http.post("/inference", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0})
            wall = time.perf_counter() - started
            response.raise_for_status()
            added_ms.append((wall - response.json()["generation_time"]) * 1000)
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
        "targets": {"ratio_http_over_engine": ">= 0.95", "added_latency_ms_p50": "<= 5"},
    }
    rows = [
        ("engine in-process, tok/s", f"{direct_tps:.2f}", ""),
        ("HTTP -> Redis -> worker, tok/s", f"{http_tps:.2f}", ""),
        ("ratio (b/a)", f"{report['ratio_http_over_engine']:.3f}", ">= 0.95"),
        ("added latency p50, 1-token job (ms)", f"{report['added_latency_ms_p50']:.2f}", "<= 5"),
        ("added latency p95, 1-token job (ms)", f"{report['added_latency_ms_p95']:.2f}", ""),
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

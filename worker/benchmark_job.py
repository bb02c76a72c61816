"""The spec's benchmark suites (standard, stress, memory), run by the worker on its loaded engine.

- standard: a fixed mix of short, medium and long prompts, 64 new tokens each, greedy.
- stress: one long generation (128 new tokens) repeated back to back: is the speed sustained?
- memory: prompts growing towards the model's context: how does memory grow with prompt length?
"""

import math

from shared.schemas import BenchmarkPrompt, BenchmarkRequest, BenchmarkResponse, GenerationParams
from worker.engine.base import Engine
from worker.job_runner import JobContext

STANDARD_PROMPTS = (
    "Why is the sky blue?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step and with an example, how a hash map handles collisions, and compare "
    "separate chaining with open addressing in terms of memory use and cache behaviour.",
)
STRESS_PROMPT = "Describe the history of the printing press and its effects on European society."
_FILLER = "The quick brown fox jumps over the lazy dog. "  # about 10 tokens in common vocabularies
MEMORY_PROMPT_TOKENS = (64, 256, 1024, 4096)


def plan(test_type: str, iterations: int, context_length: int) -> list[GenerationParams]:
    if test_type == "stress":
        return [GenerationParams(prompt=STRESS_PROMPT, max_tokens=128, temperature=0.0)] * iterations
    if test_type == "memory":
        output_tokens = 32
        budget = max(16, context_length - output_tokens - 64)  # room for the chat template
        sizes = [min(size, budget) for size in MEMORY_PROMPT_TOKENS]
        return [
            GenerationParams(
                prompt=_FILLER * max(1, sizes[i % len(sizes)] // 10), max_tokens=output_tokens, temperature=0.0
            )
            for i in range(iterations)
        ]
    return [
        GenerationParams(prompt=STANDARD_PROMPTS[i % len(STANDARD_PROMPTS)], max_tokens=64, temperature=0.0)
        for i in range(iterations)
    ]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def run(engine: Engine, request: BenchmarkRequest, context: JobContext) -> tuple[BenchmarkResponse, str]:
    runs = plan(request.test_type, request.iterations, engine.context_length)
    samples: list[BenchmarkPrompt] = []
    memory: list[float] = []
    finish_reason = "stop"
    context.set_progress(0, len(runs))
    for params in runs:
        if (stop := context.stop_reason()) is not None:
            finish_reason = stop
            break
        outcome = engine.generate(params, context)
        samples.append(
            BenchmarkPrompt(
                prompt_length=outcome.prompt_tokens,
                output_length=outcome.tokens_generated,
                tokens_per_second=outcome.tokens_per_second,
            )
        )
        memory.append(outcome.memory_used_gb)
        context.set_progress(len(samples), len(runs))
    speeds = [sample.tokens_per_second for sample in samples] or [0.0]
    report = BenchmarkResponse(
        benchmark_type=request.test_type,
        iterations=len(samples),
        avg_tokens_per_second=round(sum(speeds) / len(speeds), 3),
        min_tokens_per_second=min(speeds),
        max_tokens_per_second=max(speeds),
        p95_tokens_per_second=percentile(speeds, 0.95),
        avg_memory_usage_gb=round(sum(memory) / len(memory), 4) if memory else 0.0,
        test_prompts=samples,
    )
    return report, finish_reason

"""Task names: the API enqueues by name, so it never imports the worker's code."""

from shared.schemas import JobKind

INFERENCE_TASK = "moeserve.inference"
BENCHMARK_TASK = "moeserve.benchmark"

TASK_FOR_KIND = {JobKind.INFERENCE: INFERENCE_TASK, JobKind.BENCHMARK: BENCHMARK_TASK}

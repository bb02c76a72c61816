"""Celery tasks: each only adapts a queued job to the engine, through the job runner."""

from typing import Any

from shared.celery_app import celery_app
from shared.schemas import BenchmarkRequest, GenerationOutcome, GenerationParams
from shared.tasks import BENCHMARK_TASK, INFERENCE_TASK
from worker import benchmark
from worker.job_runner import JobContext
from worker.metrics import record_error, record_inference
from worker.runtime import get_runtime


@celery_app.task(name=INFERENCE_TASK)
def run_inference(job_id: str, params: dict[str, Any]) -> dict[str, Any] | None:
    runtime = get_runtime()

    def work(context: JobContext) -> tuple[dict[str, Any], str]:
        generation = GenerationParams.model_validate(params)
        outcome = runtime.require_engine().generate(generation, context)
        return outcome.model_dump(), outcome.finish_reason

    runtime.heartbeat.current_job = job_id
    try:
        result = runtime.runner.run(job_id, work)
        if result is not None:  # after the job's terminal event, so the caller does not wait on it
            record_inference(runtime.client, runtime.keys, GenerationOutcome.model_validate(result))
        return result
    except Exception:
        record_error(runtime.client, runtime.keys)
        raise
    finally:
        runtime.heartbeat.current_job = ""


@celery_app.task(name=BENCHMARK_TASK)
def run_benchmark(job_id: str, params: dict[str, Any]) -> dict[str, Any] | None:
    runtime = get_runtime()

    def work(context: JobContext) -> tuple[dict[str, Any], str]:
        request = BenchmarkRequest.model_validate(params)
        report, finish_reason = benchmark.run(runtime.require_engine(), request, context)
        return report.model_dump(), finish_reason

    runtime.heartbeat.current_job = job_id
    try:
        return runtime.runner.run(job_id, work, stream_tokens=False)
    finally:
        runtime.heartbeat.current_job = ""

"""Celery tasks: each claims its job, runs it on the engine and records how it ended."""

from typing import Any

from shared.celery_app import celery_app
from shared.schemas import BenchmarkRequest, GenerationParams
from shared.task_names import BENCHMARK_TASK, INFERENCE_TASK
from worker import benchmark_job
from worker.job_runner import wants_token_events
from worker.runtime import get_runtime


@celery_app.task(name=INFERENCE_TASK)
def run_inference(job_id: str, params: dict[str, Any]) -> dict[str, Any] | None:
    runtime = get_runtime()
    with runtime.job(job_id, stream_tokens=wants_token_events(params)) as job:
        if job is None:
            return None
        outcome = runtime.require_engine().generate(GenerationParams.model_validate(params), job)
        result = outcome.model_dump()
        if job.finish(result, outcome.finish_reason, counted=outcome):  # not when taken over
            runtime.heartbeat.tokens_per_second = outcome.tokens_per_second
        return result


@celery_app.task(name=BENCHMARK_TASK)
def run_benchmark(job_id: str, params: dict[str, Any]) -> dict[str, Any] | None:
    runtime = get_runtime()
    with runtime.job(job_id, stream_tokens=False) as job:
        if job is None:
            return None
        request = BenchmarkRequest.model_validate(params)
        report, finish_reason = benchmark_job.run(runtime.require_engine(), request, job)
        job.finish(report.model_dump(), finish_reason)
        return report.model_dump()

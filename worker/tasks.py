"""Celery tasks: each claims its job, runs it on the engine and records how it ended.

A task's message carries the job id alone; the parameters are read from the job's record when it is claimed,
so no broker message, and no Flower page of its arguments, holds a request. What a task returns is what
Celery logs ("Task ... succeeded in ...: <value>") and Flower shows: a summary without the completion's text,
which stays in the job's record for its own client. `_legacy`: a message queued by an older API carried the
parameters too; they are ignored, the record has them."""

from typing import Any

from shared.celery_app import celery_app
from shared.schemas import BenchmarkRequest, GenerationParams
from shared.task_names import BENCHMARK_TASK, INFERENCE_TASK
from worker import benchmark_job
from worker.runtime import get_runtime

#: The outcome's fields a task returns: counts and times, no text.
SUMMARY_FIELDS = {"tokens_generated", "prompt_tokens", "generation_time", "tokens_per_second", "finish_reason"}


@celery_app.task(name=INFERENCE_TASK)
def run_inference(job_id: str, *_legacy: Any) -> dict[str, Any] | None:
    runtime = get_runtime()
    with runtime.job(job_id) as job:
        if job is None:
            return None
        outcome = runtime.require_engine().generate(GenerationParams.model_validate(job.params), job)
        if job.finish(outcome.model_dump(), outcome.finish_reason, counted=outcome):  # not when taken over
            runtime.heartbeat.tokens_per_second = outcome.tokens_per_second
        return outcome.model_dump(include=SUMMARY_FIELDS)


@celery_app.task(name=BENCHMARK_TASK)
def run_benchmark(job_id: str, *_legacy: Any) -> dict[str, Any] | None:
    runtime = get_runtime()
    with runtime.job(job_id, stream_tokens=False) as job:
        if job is None:
            return None
        request = BenchmarkRequest.model_validate(job.params)
        report, finish_reason = benchmark_job.run(runtime.require_engine(), request, job)
        job.finish(report.model_dump(), finish_reason)
        return report.model_dump()

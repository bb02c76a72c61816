from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import JobServiceDep, SettingsDep
from api.errors import error_responses, invalid_request
from api.routes.common import accepted, wants_async
from api.services.jobs import WaitTimeout
from shared.schemas import BenchmarkRequest, BenchmarkResponse, JobAccepted, JobKind

router = APIRouter(tags=["benchmark"])


@router.post(
    "/benchmark",
    response_model=BenchmarkResponse,
    responses={202: {"model": JobAccepted}, **error_responses(400, 429, 500, 503)},
)
async def create_benchmark(
    body: BenchmarkRequest,
    jobs: JobServiceDep,
    settings: SettingsDep,
    respond_async: Annotated[bool, Depends(wants_async)],
):
    """Run a benchmark suite through the same queue as inference; progress shows on GET /jobs/{id}."""
    if body.iterations > settings.benchmark_max_iterations:
        raise invalid_request(f"iterations must be at most {settings.benchmark_max_iterations}", "iterations")
    job_id = await jobs.submit(JobKind.BENCHMARK, body.model_dump())
    if respond_async:
        return accepted(job_id)
    try:
        return await jobs.wait_result(job_id, settings.sync_wait_timeout_s)
    except WaitTimeout:
        return accepted(job_id)

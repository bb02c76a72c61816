from typing import Annotated

from fastapi import APIRouter, Depends
from sse_starlette import EventSourceResponse

from api.deps import JobServiceDep, SettingsDep
from api.errors import error_responses
from api.routes.common import accepted, wants_async
from api.services.inference import generation_params, spec_response, sse_events
from api.services.jobs import WaitTimeout
from shared.schemas import InferenceRequest, InferenceResponse, JobAccepted, JobKind

router = APIRouter(tags=["inference"])


@router.post(
    "/inference",
    response_model=InferenceResponse,
    responses={202: {"model": JobAccepted}, **error_responses(400, 409, 429, 500, 503)},
)
async def create_inference(
    body: InferenceRequest,
    jobs: JobServiceDep,
    settings: SettingsDep,
    respond_async: Annotated[bool, Depends(wants_async)],
):
    """Generate a completion. Waits for it, streams it (`stream: true`), or answers 202 with a job id
    (`Prefer: respond-async`)."""
    params = generation_params(body, settings)
    job_id = await jobs.submit(JobKind.INFERENCE, params.model_dump())
    if respond_async:
        return accepted(job_id)
    if body.stream:
        return EventSourceResponse(sse_events(jobs, job_id, settings.sync_wait_timeout_s))
    try:
        result = await jobs.wait_result(job_id, settings.sync_wait_timeout_s)
    except WaitTimeout:
        return accepted(job_id)  # still running: nothing is lost, the caller polls it
    return spec_response(result)

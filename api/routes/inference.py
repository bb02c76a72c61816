from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import CallerDep, GenerationDep, JobServiceDep, SettingsDep
from api.errors import error_responses
from api.routes.common import accepted, wants_async
from api.services.inference import generation_params, spec_response, sse_events
from api.services.jobs import WaitTimeout
from shared.schemas import InferenceRequest, InferenceResponse, JobAccepted

router = APIRouter(tags=["inference"])


@router.post(
    "/inference",
    response_model=InferenceResponse,
    responses={202: {"model": JobAccepted}, **error_responses(400, 409, 429, 500, 503)},
)
async def create_inference(
    body: InferenceRequest,
    jobs: JobServiceDep,
    generations: GenerationDep,
    settings: SettingsDep,
    caller: CallerDep,
    respond_async: Annotated[bool, Depends(wants_async)],
) -> InferenceResponse | EventSourceResponse | JSONResponse:
    """Generate a completion. Waits for it, streams it (`stream: true`), or answers 202 with a job id
    (`Prefer: respond-async`)."""
    job = await generations.submit(generation_params(body, settings), caller)
    if respond_async:
        return accepted(job.id)
    if body.stream:
        return EventSourceResponse(sse_events(generations, job))
    try:
        result = await jobs.wait_result(job.id, settings.sync_wait_timeout_s)
    except WaitTimeout:
        return accepted(job.id)  # still running: nothing is lost, the caller polls it
    return spec_response(result)

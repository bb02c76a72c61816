"""OpenAI's API: each route adapts a request to a generation job and its outcome back (api/openai/serving.py)."""

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from api.deps import CallerDep, FleetDep, GenerationDep, SettingsDep
from api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
    OpenAIErrorResponse,
)
from api.openai.serving import (
    chat_chunks,
    chat_completion,
    chat_params,
    completion,
    completion_chunks,
    completion_params,
    model_list,
)
from api.services.auth import Caller
from api.services.generation import GenerationJob, GenerationJobs
from api.services.served_models import check_model, served_models
from shared.schemas import GenerationOutcome, GenerationParams

Response = TypeVar("Response", ChatCompletion, Completion)

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 404, 409, 429, 500, 503, 504)
}


@router.get("/models", response_model=ModelList)
async def list_models(fleet: FleetDep, settings: SettingsDep, _: CallerDep) -> ModelList:
    """The model the workers have loaded (and its aliases)."""
    return model_list(await served_models(fleet, settings))


async def _respond(
    body: ChatCompletionRequest | CompletionRequest,
    params: GenerationParams,
    request: Request,
    generations: GenerationJobs,
    caller: Caller,
    chunks: Callable[..., AsyncIterator[dict[str, str]]],
    complete: Callable[[GenerationJob, str, GenerationOutcome], Response],
) -> Response | EventSourceResponse:
    """Both routes' flow: enqueue, then stream SSE chunks or wait for the whole outcome."""
    job = await generations.submit(params, caller)
    if body.stream:
        events = await generations.open_stream(job, request)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventSourceResponse(chunks(job, body.model, events, include_usage))
    return complete(job, body.model, await generations.outcome(job, request))


@router.post("/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    generations: GenerationDep,
    fleet: FleetDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> ChatCompletion | EventSourceResponse:
    """Chat: the worker renders `messages` with the model's chat template. `stream: true` for SSE chunks."""
    await check_model(fleet, settings, body.model)
    params = chat_params(body, settings)
    return await _respond(body, params, request, generations, caller, chat_chunks, chat_completion)


@router.post("/completions", response_model=Completion, responses=_ERRORS)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    generations: GenerationDep,
    fleet: FleetDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> Completion | EventSourceResponse:
    """Raw completion: the prompt goes to the model as it is, no chat template."""
    await check_model(fleet, settings, body.model)
    params = completion_params(body, settings)
    return await _respond(body, params, request, generations, caller, completion_chunks, completion)

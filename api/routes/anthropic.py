"""Anthropic's Messages API: the route adapts a request to a generation job (api/anthropic/serving.py)."""

from typing import Any

from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse

from api.anthropic.protocol import AnthropicErrorResponse, Message, MessagesRequest
from api.anthropic.serving import message, message_events, message_params
from api.deps import CallerDep, FleetDep, GenerationDep, SettingsDep
from api.services.served_models import check_model

router = APIRouter(prefix="/v1", tags=["anthropic"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": AnthropicErrorResponse} for code in (400, 404, 409, 429, 500, 503, 504)
}


@router.post("/messages", response_model=Message, responses=_ERRORS)
async def create_message(
    body: MessagesRequest,
    request: Request,
    generations: GenerationDep,
    fleet: FleetDep,
    settings: SettingsDep,
    caller: CallerDep,
    x_api_key: str | None = Header(None, description="accepted, not checked"),
    anthropic_version: str | None = Header(None, description="accepted, not checked"),
) -> Message | EventSourceResponse:
    """A message in Anthropic's format; `stream: true` for its event stream."""
    await check_model(fleet, settings, body.model)
    job = await generations.submit(message_params(body, settings), caller)
    if body.stream:
        events = await generations.open_stream(job, request)
        return EventSourceResponse(message_events(job, body.model, events))
    return message(job, body.model, await generations.outcome(job, request))

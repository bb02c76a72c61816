"""Inference requests: checks that need settings, and the SSE rendering of a job's event stream."""

import json
from collections.abc import AsyncIterator
from typing import Any

from api.errors import APIError, invalid_request
from api.services.generation import GenerationJob, GenerationJobs, TextDelta
from api.services.request_checks import checked_max_tokens, checked_prompt_length, checked_stop
from shared.config import Settings
from shared.schemas import GenerationParams, InferenceRequest, InferenceResponse


def generation_params(body: InferenceRequest, settings: Settings) -> GenerationParams:
    max_tokens = checked_max_tokens(body.max_tokens, settings)
    if not body.prompt.strip():
        raise invalid_request("prompt must not be empty or only whitespace", "prompt")
    checked_prompt_length(len(body.prompt), settings, "prompt")
    return GenerationParams(
        prompt=body.prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        apply_chat_template=settings.apply_chat_template,
        top_p=body.top_p,
        stop=checked_stop(body.stop),
        seed=body.seed,
        stream_tokens=body.stream,
    )


def spec_response(result: dict[str, Any]) -> InferenceResponse:
    return InferenceResponse.model_validate({key: result[key] for key in InferenceResponse.model_fields})


async def sse_events(generations: GenerationJobs, job: GenerationJob) -> AsyncIterator[dict[str, str]]:
    """`token` events with {"text"}, then one `done` (the spec's JSON) or `error` (the error envelope)."""
    try:
        async for event in generations.events(job):
            if isinstance(event, TextDelta):
                yield {"event": "token", "data": json.dumps({"text": event.text})}
            else:
                yield {"event": "done", "data": spec_response(event.model_dump()).model_dump_json()}
    except APIError as error:
        yield {
            "event": "error",
            "data": json.dumps({"error": {"type": error.type.value, "message": error.message, "param": error.param}}),
        }

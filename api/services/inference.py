"""Inference requests: checks that need settings, and the SSE rendering of a job's event stream."""

import asyncio
import json
from collections.abc import AsyncIterator

from api.errors import invalid_request
from api.services.jobs import JobService, WaitTimeout
from shared.config import Settings
from shared.schemas import EventType, GenerationParams, InferenceRequest, InferenceResponse


def generation_params(body: InferenceRequest, settings: Settings) -> GenerationParams:
    max_tokens = settings.max_tokens_default if body.max_tokens is None else body.max_tokens
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise invalid_request(
            f"max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}", "max_tokens"
        )
    if not body.prompt.strip():
        raise invalid_request("prompt must not be empty or only whitespace", "prompt")
    if len(body.prompt) > settings.max_prompt_chars:
        raise invalid_request(
            f"prompt is {len(body.prompt)} characters; the limit is {settings.max_prompt_chars}", "prompt"
        )
    return GenerationParams(
        prompt=body.prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        apply_chat_template=settings.apply_chat_template,
    )


def spec_response(result: dict) -> InferenceResponse:
    return InferenceResponse.model_validate({key: result[key] for key in InferenceResponse.model_fields})


async def sse_events(jobs: JobService, job_id: str, timeout_s: float) -> AsyncIterator[dict]:
    """`token` events with {"text"}, then one `done` (the spec's JSON) or `error` (the error envelope)."""
    finished = False
    try:
        async for event, data in jobs.events(job_id, timeout_s):
            if event is EventType.TOKEN:
                yield {"event": "token", "data": json.dumps(data)}
                continue
            finished = True
            if event is EventType.DONE:
                yield {"event": "done", "data": spec_response(data).model_dump_json()}
            else:
                yield {"event": "error", "data": json.dumps({"error": data})}
    except WaitTimeout:
        finished = True
        yield {
            "event": "error",
            "data": json.dumps(
                {
                    "error": {
                        "type": "timeout_error",
                        "message": f"no result within {timeout_s:.0f} s; poll /jobs/{job_id}",
                    }
                }
            ),
        }
    finally:
        if not finished:
            # The client went away mid-stream: stop generating for nobody.
            await asyncio.shield(jobs.request_cancel(job_id))

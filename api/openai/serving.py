"""OpenAI requests -> generation jobs, and job outcomes and text -> OpenAI responses and stream chunks."""

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from api.errors import APIError, invalid_request
from api.openai.errors import openai_error
from api.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FinishReason,
    ModelCard,
    ModelList,
    TimeoutNote,
    Usage,
)
from api.services.generation import GenerationJob, GenerationStream, TextDelta
from api.services.request_checks import checked_max_tokens, checked_prompt_length, checked_stop, request_deadline
from api.services.served_models import ServedModel
from shared.config import Settings
from shared.schemas import ChatMessage, GenerationOutcome, GenerationParams

DONE = {"data": "[DONE]"}


# ---------------------------------------------------------------- requests


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, settings: Settings, max_tokens: int | None, max_tokens_param: str
) -> dict[str, Any]:
    if body.stream_options is not None and not body.stream:
        raise invalid_request("stream_options is only allowed when stream is true", "stream_options")
    return {
        "max_tokens": checked_max_tokens(max_tokens, settings, max_tokens_param),
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": checked_stop(body.stop),
        "seed": body.seed,
        "deadline": request_deadline(body.timeout, settings),
        "stream_tokens": body.stream,
    }


def chat_params(body: ChatCompletionRequest, settings: Settings) -> GenerationParams:
    messages = [ChatMessage(role=message.template_role, content=message.text) for message in body.messages]
    checked_prompt_length(sum(len(message.content) for message in messages), settings, "messages")
    max_tokens: int | None = body.max_tokens
    param = "max_tokens"
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    return GenerationParams(messages=messages, **_sampling(body, settings, max_tokens, param))


def completion_params(body: CompletionRequest, settings: Settings) -> GenerationParams:
    if not body.prompt_text:
        raise invalid_request("prompt must not be empty", "prompt")
    checked_prompt_length(len(body.prompt_text), settings, "prompt")
    return GenerationParams(
        prompt=body.prompt_text, apply_chat_template=False, **_sampling(body, settings, body.max_tokens, "max_tokens")
    )


# ---------------------------------------------------------------- responses


def model_list(models: list[ServedModel]) -> ModelList:
    return ModelList(data=[ModelCard(id=model.id, created=model.created, owned_by=model.owned_by) for model in models])


def finish_reason(outcome: GenerationOutcome) -> FinishReason:
    return "length" if outcome.finish_reason in ("length", "timeout") else "stop"


def timeout_note(outcome: GenerationOutcome) -> TimeoutNote | None:
    if outcome.finish_reason != "timeout":
        return None
    return TimeoutNote(
        message=f"the request's deadline passed after {outcome.tokens_generated} tokens; the text is cut short"
    )


def usage(outcome: GenerationOutcome) -> Usage:
    return Usage(
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.tokens_generated,
        total_tokens=outcome.prompt_tokens + outcome.tokens_generated,
    )


def chat_completion(job: GenerationJob, model: str, outcome: GenerationOutcome) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{job.id}",
        created=job.created,
        model=model,
        usage=usage(outcome),
        error=timeout_note(outcome),
        choices=[ChatChoice(message=ChatCompletionMessage(content=outcome.text), finish_reason=finish_reason(outcome))],
    )


def completion(job: GenerationJob, model: str, outcome: GenerationOutcome) -> Completion:
    return Completion(
        id=f"cmpl-{job.id}",
        created=job.created,
        model=model,
        usage=usage(outcome),
        error=timeout_note(outcome),
        choices=[CompletionChoice(text=outcome.text, finish_reason=finish_reason(outcome))],
    )


# ---------------------------------------------------------------- streams

# (text, finish_reason) -> one chunk
ChunkFactory = Callable[[str | None, FinishReason | None], BaseModel]


def _data(chunk: BaseModel, include_usage: bool) -> dict[str, Any]:
    # A chunk's usage is null until the usage chunk when asked for, and absent otherwise (as OpenAI does).
    return {"data": chunk.model_dump_json(exclude={"error"} if include_usage else {"error", "usage"})}


async def _sse(
    events: GenerationStream,
    chunk: ChunkFactory,
    usage_chunk: Callable[[Usage], BaseModel],
    include_usage: bool,
) -> AsyncIterator[dict[str, str]]:
    """`data: {chunk}` per piece of text, a last chunk with the finish reason, the usage chunk when asked for,
    then `data: [DONE]`; a failure mid-stream is a `data: {"error": ...}` line before it."""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield _data(chunk(event.text, None), include_usage)
                    continue
                yield _data(chunk(None, finish_reason(event)), include_usage)
                if include_usage:
                    yield _data(usage_chunk(usage(event)), include_usage)
                if (note := timeout_note(event)) is not None:
                    yield {"data": json.dumps({"error": note.model_dump()})}
        except APIError as error:
            yield {"data": json.dumps({"error": openai_error(error).model_dump()})}
    yield DONE


def chat_chunks(
    job: GenerationJob, model: str, events: GenerationStream, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    def chunk(text: str | None, finish: FinishReason | None) -> ChatCompletionChunk:
        delta = ChatDelta(content=text) if finish is None else ChatDelta()
        return ChatCompletionChunk(
            id=f"chatcmpl-{job.id}",
            created=job.created,
            model=model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
        )

    def usage_chunk(totals: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=f"chatcmpl-{job.id}", created=job.created, model=model, choices=[], usage=totals)

    async def with_role() -> AsyncIterator[dict[str, str]]:
        opening = ChatCompletionChunk(
            id=f"chatcmpl-{job.id}",
            created=job.created,
            model=model,
            choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
        )
        yield _data(opening, include_usage)
        async for item in _sse(events, chunk, usage_chunk, include_usage):
            yield item

    return with_role()


def completion_chunks(
    job: GenerationJob, model: str, events: GenerationStream, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    def chunk(text: str | None, finish: FinishReason | None) -> Completion:
        return Completion(
            id=f"cmpl-{job.id}",
            created=job.created,
            model=model,
            choices=[CompletionChoice(text=text or "", finish_reason=finish)],
        )

    def usage_chunk(totals: Usage) -> Completion:
        return Completion(id=f"cmpl-{job.id}", created=job.created, model=model, choices=[], usage=totals)

    return _sse(events, chunk, usage_chunk, include_usage)

"""Anthropic Messages requests -> generation jobs, and job outcomes and text -> messages and stream events."""

from collections.abc import AsyncIterator
from contextlib import aclosing

from api.anthropic.errors import anthropic_error
from api.anthropic.protocol import (
    AnthropicErrorResponse,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    Message,
    MessageDeltaBody,
    MessageDeltaEvent,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    MessageUsage,
    StopReason,
    StreamEvent,
    TextBlock,
    TextDeltaBody,
    TimeoutNote,
    text_of,
)
from api.errors import APIError
from api.services.generation import GenerationJob, GenerationStream, TextDelta
from api.services.request_checks import checked_max_tokens, checked_prompt_length, checked_stop, request_deadline
from shared.config import Settings
from shared.schemas import ChatMessage, GenerationOutcome, GenerationParams


def message_params(body: MessagesRequest, settings: Settings) -> GenerationParams:
    messages = [ChatMessage(role="system", content=text_of(body.system))] if body.system else []
    messages += [ChatMessage(role=message.role, content=text_of(message.content)) for message in body.messages]
    checked_prompt_length(sum(len(message.content) for message in messages), settings, "messages")
    return GenerationParams(
        messages=messages,
        max_tokens=checked_max_tokens(body.max_tokens, settings),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=checked_stop(body.stop_sequences, "stop_sequences"),
        deadline=request_deadline(body.timeout, settings),
        stream_tokens=bool(body.stream),
    )


def stop_reason(outcome: GenerationOutcome) -> StopReason:
    if outcome.finish_reason in ("length", "timeout"):
        return "max_tokens"
    return "stop_sequence" if outcome.stop_sequence is not None else "end_turn"


def timeout_note(outcome: GenerationOutcome) -> TimeoutNote | None:
    if outcome.finish_reason != "timeout":
        return None
    return TimeoutNote(
        message=f"the request's deadline passed after {outcome.tokens_generated} tokens; the text is cut short"
    )


def _usage(outcome: GenerationOutcome) -> MessageUsage:
    return MessageUsage(input_tokens=outcome.prompt_tokens, output_tokens=outcome.tokens_generated)


def message(job: GenerationJob, model: str, outcome: GenerationOutcome) -> Message:
    return Message(
        id=f"msg_{job.id}",
        model=model,
        content=[TextBlock(text=outcome.text)],
        stop_reason=stop_reason(outcome),
        stop_sequence=outcome.stop_sequence,
        usage=_usage(outcome),
        error=timeout_note(outcome),
    )


def _event(body: StreamEvent) -> dict[str, str]:
    return {"event": body.type, "data": body.model_dump_json(exclude={"message": {"error"}})}


async def message_events(job: GenerationJob, model: str, events: GenerationStream) -> AsyncIterator[dict[str, str]]:
    """message_start, content_block_start, a content_block_delta per piece of text, content_block_stop,
    message_delta (stop reason, usage), message_stop; an `error` event in place of the rest on a failure."""
    empty = Message(id=f"msg_{job.id}", model=model, content=[], usage=MessageUsage(input_tokens=0, output_tokens=0))
    yield _event(MessageStartEvent(message=empty))
    yield _event(ContentBlockStartEvent())
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield _event(ContentBlockDeltaEvent(delta=TextDeltaBody(text=event.text)))
                    continue
                yield _event(ContentBlockStopEvent())
                delta = MessageDeltaBody(stop_reason=stop_reason(event), stop_sequence=event.stop_sequence)
                yield _event(MessageDeltaEvent(delta=delta, usage=_usage(event)))
                if (note := timeout_note(event)) is not None:
                    yield {
                        "event": "error",
                        "data": AnthropicErrorResponse.model_validate(
                            {"error": {"type": note.type, "message": note.message}}
                        ).model_dump_json(),
                    }
                    return
            yield _event(MessageStopEvent())
        except APIError as error:
            yield {"event": "error", "data": AnthropicErrorResponse(error=anthropic_error(error)).model_dump_json()}

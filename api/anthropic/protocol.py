"""Anthropic's Messages API bodies: the request, the message, the stream's events and the error envelope.

Requests are strict like the OpenAI ones: an unknown field is a 400, and a parameter this service does not
implement (tools, thinking, top_k, images...) is accepted only at its no-op value, else a 400 naming it.
"""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from api.request_models import NoOpValues, StrictFloat, StrictRequest, no_op_only, unsupported

_TEXT_BLOCK_KEYS = {"type", "text", "cache_control"}  # a cache hint is a no-op here


def _text_blocks_only(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    for block in content if isinstance(content, list) else ():
        kind = block.get("type")
        if kind != "text":
            raise unsupported(f"content of type '{kind}'", "messages take text only")
        if not isinstance(block.get("text"), str) or not set(block) <= _TEXT_BLOCK_KEYS:
            raise PydanticCustomError("invalid_content", 'a text block is {"type": "text", "text": "..."}')
    return content


Content = Annotated[StrictStr | list[dict[str, Any]], AfterValidator(_text_blocks_only)]


def text_of(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "\n".join(block["text"] for block in content)


class InputMessage(StrictRequest):
    role: Literal["user", "assistant"]
    content: Content


class Metadata(StrictRequest):
    user_id: StrictStr | None = None


class MessagesRequest(StrictRequest):
    model: StrictStr
    messages: list[InputMessage] = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    system: Content | None = None
    temperature: StrictFloat | None = Field(None, ge=0.0, le=1.0, description="default 1; 0 = greedy")
    top_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    stop_sequences: list[StrictStr] | None = None
    stream: StrictBool | None = False
    metadata: Metadata | None = None
    timeout: StrictFloat | None = Field(
        None, description="seconds until the job stops (an extension; at most JOB_TIMEOUT_S)"
    )
    cache_control: Any = None  # a prompt-caching hint: nothing to do here
    # Accepted at their no-op value only.
    top_k: Any = None
    output_config: Any = None
    speed: Any = None
    tools: Any = None
    tool_choice: Any = None
    thinking: Any = None
    service_tier: Any = None
    container: Any = None
    mcp_servers: Any = None

    _NO_OP: ClassVar[NoOpValues] = {
        "top_k": (None,),
        "tools": (None, []),
        "tool_choice": (None, {"type": "none"}),
        "thinking": (None, {"type": "disabled"}),
        "service_tier": (None, "auto", "standard_only"),
        "container": (None,),
        "mcp_servers": (None, []),
        "output_config": (None,),
        "speed": (None, "standard"),
    }

    _no_op_only = no_op_only(_NO_OP)


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class TimeoutNote(BaseModel):
    """Set on a message the request's deadline cut short (stop_reason "max_tokens")."""

    type: Literal["timeout_error"] = "timeout_error"
    message: str


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage
    error: TimeoutNote | None = None


# ---------------------------------------------------------------- stream events


class StreamEvent(BaseModel):
    """One server-sent event of a streamed message; its `type` is also the event's name."""

    type: str


class MessageStartEvent(StreamEvent):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(StreamEvent):
    type: Literal["content_block_start"] = "content_block_start"
    index: int = 0
    content_block: TextBlock = TextBlock(text="")


class TextDeltaBody(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ContentBlockDeltaEvent(StreamEvent):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int = 0
    delta: TextDeltaBody


class ContentBlockStopEvent(StreamEvent):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int = 0


class MessageDeltaBody(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDeltaEvent(StreamEvent):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: MessageUsage  # input_tokens too: the worker counts the prompt, so message_start cannot


class MessageStopEvent(StreamEvent):
    type: Literal["message_stop"] = "message_stop"


# ---------------------------------------------------------------- errors

AnthropicErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]


class AnthropicErrorDetail(BaseModel):
    type: AnthropicErrorType
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail

"""OpenAI's request and response bodies for `/v1/models`, `/v1/completions` and `/v1/chat/completions`.

Requests are strict: an unknown field is a 400, and an OpenAI parameter this service does not implement
(more than one choice, logprobs, tools, images...) is accepted only at its no-op value, else a 400 naming it.
"""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from api.request_models import NoOpValues, StrictFloat, StrictRequest, no_op_only, unsupported

Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)]


class StreamOptions(StrictRequest):
    include_usage: StrictBool = False


class _SamplingRequest(StrictRequest):
    """What both completion endpoints take."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: Seed | None = None
    n: StrictInt | None = Field(None, description="only 1")
    user: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    timeout: StrictFloat | None = Field(
        None, description="seconds until the job stops (an extension; at most JOB_TIMEOUT_S)"
    )
    # Accepted at their no-op value only.
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    service_tier: Any = None

    _NO_OP: ClassVar[NoOpValues] = {
        "frequency_penalty": (None, 0, 0.0),
        "presence_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
        "logprobs": (None, False, 0),
        "top_logprobs": (None, 0),
        "response_format": (None, {"type": "text"}),
        "service_tier": (None, "auto", "default"),
    }

    _no_op_only = no_op_only(_NO_OP)

    @field_validator("n", mode="after")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise unsupported(f"n={value}", "it returns one choice per request (n=1)")
        return value


# ---------------------------------------------------------------- chat


class ChatMessageIn(StrictRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[dict[str, Any]]
    # Accepted at their no-op value only.
    name: Any = None
    tool_calls: Any = None
    refusal: Any = None

    _NO_OP: ClassVar[NoOpValues] = {"name": (None,), "tool_calls": (None, []), "refusal": (None,)}

    _no_op_only = no_op_only(_NO_OP)

    @field_validator("content", mode="after")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type")
            if kind != "text":
                raise unsupported(f"content of type '{kind}'", "messages take text only")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise PydanticCustomError("invalid_content", 'a text part is {"type": "text", "text": "..."}')
        return content

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)

    @property
    def template_role(self) -> Literal["system", "user", "assistant"]:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    # Accepted at their no-op value only.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None

    _NO_OP: ClassVar[NoOpValues] = {
        **_SamplingRequest._NO_OP,
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None,),
        "functions": (None, []),
        "function_call": (None, "none"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "web_search_options": (None,),
        "store": (None, False),
        "metadata": (None, {}),
    }

    _no_op_only = no_op_only(_NO_OP)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class TimeoutNote(BaseModel):
    """Set on a response the request's deadline cut short (finish_reason "length")."""

    type: Literal["timeout_error"] = "timeout_error"
    message: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    error: TimeoutNote | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- completions


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr]
    # Accepted at their no-op value only.
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    _NO_OP: ClassVar[NoOpValues] = {
        **_SamplingRequest._NO_OP,
        "echo": (None, False),
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    _no_op_only = no_op_only(_NO_OP)

    @field_validator("prompt", mode="after")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise unsupported(f"a batch of {len(prompt)} prompts", "send one prompt per request")
        return prompt

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    error: TimeoutNote | None = None


# ---------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail

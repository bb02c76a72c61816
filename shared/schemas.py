"""Pydantic models for the HTTP contract (the native API in README.md) and for jobs on the queue."""

import json
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    computed_field,
    field_validator,
    model_validator,
)

StrictFloat = Annotated[float, Field(strict=True)]

#: Stop strings one request may give (OpenAI's limit).
MAX_STOP_STRINGS = 4


class _Request(BaseModel):
    # Unknown fields are an error, not silently dropped: a typo like "max_token" must not pass.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- inference


class InferenceRequest(_Request):
    prompt: StrictStr = Field(min_length=1, description="Input text prompt")
    max_tokens: StrictInt | None = Field(None, ge=1, description="Maximum tokens to generate (default 100)")
    temperature: StrictFloat = Field(0.7, ge=0.0, le=2.0, description="0 means greedy decoding")
    stream: StrictBool = Field(False, description="Stream tokens as Server-Sent Events")
    top_p: StrictFloat = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Nucleus sampling: keep the most likely tokens whose probabilities add up to this (1 = all)",
    )
    stop: StrictStr | list[StrictStr] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings that end generation; the stop text is not returned"
    )
    seed: StrictInt | None = Field(
        None, ge=-(2**63), lt=2**64, description="Seeds sampling: the same seed, prompt and settings give the same text"
    )


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(BaseModel):
    """What the worker needs to run one generation; travels as the Celery task's payload.

    A job carries either a `prompt` (wrapped in the chat template as one user turn when
    `apply_chat_template`) or `messages` (always rendered by the model's chat template, on the worker,
    which has the tokenizer).
    """

    prompt: str = ""
    messages: list[ChatMessage] | None = None
    max_tokens: int
    min_tokens: int = Field(0, description="tokens generated before an end-of-sequence token may stop it")
    temperature: float
    apply_chat_template: bool = True
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    deadline: float | None = Field(None, description="epoch seconds after which generation stops (timeout)")
    stream_tokens: bool = Field(
        True,
        description="publish each token as a job event for a streamed response; off when only the outcome is "
        "awaited, so that nothing wakes the API at every token",
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "GenerationParams":
        if (self.messages is None) == (not self.prompt):
            raise ValueError("a generation takes either a prompt or messages")
        return self


class InferenceResponse(BaseModel):
    text: str
    tokens_generated: int
    generation_time: float
    tokens_per_second: float
    memory_used_gb: float


class GenerationOutcome(InferenceResponse):
    """The worker's full result: the spec's fields plus what OpenAI-style responses need."""

    prompt_tokens: int
    finish_reason: Literal["stop", "length", "cancelled", "timeout"]
    stop_sequence: str | None = Field(None, description="the stop string that ended generation, if one did")


# ---------------------------------------------------------------- benchmark


class BenchmarkRequest(_Request):
    test_type: Literal["standard", "stress", "memory"] = "standard"
    iterations: StrictInt = Field(10, ge=1)


class BenchmarkPrompt(BaseModel):
    prompt_length: int
    output_length: int
    tokens_per_second: float
    memory_used_gb: float = Field(0.0, description="the engine's memory once this prompt was done")


class BenchmarkResponse(BaseModel):
    benchmark_type: str
    iterations: int
    avg_tokens_per_second: float
    min_tokens_per_second: float
    max_tokens_per_second: float
    p95_tokens_per_second: float
    avg_memory_usage_gb: float
    test_prompts: list[BenchmarkPrompt]


# ---------------------------------------------------------------- jobs


class JobKind(StrEnum):
    INFERENCE = "inference"
    BENCHMARK = "benchmark"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class ErrorType(StrEnum):
    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    NOT_FOUND = "not_found_error"
    QUEUE_FULL = "queue_full_error"
    MODEL_NOT_READY = "model_not_ready_error"
    SERVICE_UNAVAILABLE = "service_unavailable_error"
    INFERENCE = "inference_error"
    CANCELLED = "cancelled_error"
    TIMEOUT = "timeout_error"


class JobError(BaseModel):
    type: ErrorType
    message: str
    param: str | None = None


class JobView(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    progress: str | None = Field(None, description="done/total steps, for benchmarks")
    result: dict[str, Any] | None = None
    error: JobError | None = None


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    location: str


# ---------------------------------------------------------------- stream events


class EventType(StrEnum):
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


# ---------------------------------------------------------------- metrics / health


class ExpertCacheCounters(BaseModel):
    """An expert cache's counters: one layer's as the worker counts them, or summed over layers and workers."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = Field(0, description="expert rows copied into device slots from host RAM, over the bus")
    bytes_copied_on_device: int = Field(
        0,
        description="expert rows copied into device slots from a decode step's gather scratch (device to device: "
        "a row that crossed the bus for the step, not sent again)",
    )
    bytes_gathered: int = Field(
        0, description="expert rows a decode step on the device (graph decode) read from host RAM over the bus"
    )
    prefetched: int = Field(0, description="experts copied in ahead of need")
    prefetch_hits: int = Field(0, description="prefetched experts that a token then used")
    computed_on_host: int = Field(0, description="misses computed on the CPU instead of copied (also misses)")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float:
        used = self.hits + self.misses
        return self.hits / used if used else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bytes_over_bus(self) -> int:
        """Every expert byte that crossed from host RAM to the device: slot fills and the steps' gathers."""
        return self.bytes_copied + self.bytes_gathered

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ExpertCacheCounters.model_fields}

    @classmethod
    def total(cls, parts: Iterable["ExpertCacheCounters"]) -> "ExpertCacheCounters":
        total = ExpertCacheCounters()
        for part in parts:
            for name, value in part.counters().items():
                setattr(total, name, getattr(total, name) + value)
        return total


class ExpertOffloadStats(ExpertCacheCounters):
    """The MoE offload engine's expert cache since the model loaded, summed over its layers."""

    slots_per_layer: int
    experts_per_layer: int
    miss_mode: str = Field(description="copy | cpu | hybrid: what happens to an expert with no device slot")
    cpu_share: float = Field(description="share of misses computed on the CPU, as decided at load")

    @classmethod
    def over_workers(cls, parts: list["ExpertOffloadStats"]) -> "ExpertOffloadStats | None":
        """Counters summed over workers (their layout and mode taken from the first)."""
        if not parts:
            return None
        return parts[0].model_copy(update=ExpertCacheCounters.total(parts).counters())


class WorkerStatus(BaseModel):
    """One worker as /health and /metrics list it, from its last heartbeat."""

    id: str
    hostname: str
    state: "WorkerState"
    model: str
    device: str
    current_job: str | None = Field(description="the job it runs now; null when idle")
    heartbeat_age_s: float = Field(description="seconds since its last heartbeat")
    tokens_per_second: float | None = Field(description="of its last finished inference; null before its first")


class MetricsResponse(BaseModel):
    model_loaded: bool
    gpu_memory_used_gb: float
    gpu_memory_total_gb: float
    system_memory_used_gb: float
    avg_tokens_per_second: float
    total_inferences: int
    uptime_seconds: float
    expert_offload: ExpertOffloadStats | None = Field(
        None, description="expert cache counters of the workers serving an offloaded MoE model; null otherwise"
    )
    workers: list[WorkerStatus] = Field(default_factory=list, description="each worker with a fresh heartbeat")


class DecodeSpeedCheck(BaseModel):
    """Whether recent jobs decoded at the speed the service promises (MIN_TOKENS_PER_SECOND)."""

    meets_minimum: bool | None = Field(description="null when no job ran recently: an idle service is not slow")
    recent_tokens_per_second: float | None = Field(description="average of the last 100 jobs, if one ran recently")
    min_tokens_per_second: float
    affects_status: bool = Field(description="whether a slow service answers 503 (HEALTH_REQUIRES_MIN_SPEED)")


class HealthResponse(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model_ready: bool
    gpu_available: bool
    memory_sufficient: bool
    last_inference: datetime | None
    performance: DecodeSpeedCheck | None = None
    workers: list[WorkerStatus] = Field(default_factory=list, description="each worker with a fresh heartbeat")


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: ErrorType
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The one error envelope every endpoint answers with (OpenAI's shape)."""

    error: ErrorDetail


# ---------------------------------------------------------------- worker heartbeat


class WorkerState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class WorkerHeartbeat(BaseModel):
    """What each worker writes to its heartbeat hash every few seconds."""

    worker_id: str
    hostname: str
    pid: int
    model: str
    state: WorkerState
    device: str = "cpu"
    dtype: str = ""
    context_length: int = 0
    started_at: float
    last_heartbeat: float
    current_job: str = ""
    tokens_per_second: float = 0.0  # of the worker's last finished inference; 0 before its first
    load_error: str = ""
    process_rss_gb: float = 0.0
    system_memory_used_gb: float = 0.0
    system_memory_total_gb: float = 0.0
    system_memory_available_gb: float = 0.0
    gpu_name: str = ""
    gpu_memory_used_gb: float = 0.0
    gpu_memory_total_gb: float = 0.0
    expert_offload: ExpertOffloadStats | None = None

    @field_validator("expert_offload", mode="before")
    @classmethod
    def _from_redis_json(cls, value: object) -> object:
        if isinstance(value, str):  # a hash field holds it as JSON; "" = none
            return json.loads(value) if value else None
        return value

    def to_redis(self) -> dict[str, str]:
        fields = self.model_dump(mode="json")
        offload = fields.pop("expert_offload")
        fields = {key: str(value) for key, value in fields.items()}
        fields["expert_offload"] = json.dumps(offload) if offload else ""
        return fields

    @property
    def model_loaded(self) -> bool:
        return self.state is WorkerState.READY

    def is_fresh(self, now: float, stale_after_s: float) -> bool:
        return now - self.last_heartbeat <= stale_after_s

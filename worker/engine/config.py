"""What an engine is told: one `EngineConfig`, built by whoever runs it (the worker from its settings, a test,
a benchmark) and handed over whole. The defaults here are the only ones; the worker's settings take theirs
from this class."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DeviceName = Literal["auto", "cpu", "cuda"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
DecodeCompile = Literal["auto", "on", "off"]
CpuWeights = Literal["auto", "int4", "float"]


@dataclass(frozen=True)
class EngineConfig:
    """`model_path`: a folder or a Hugging Face id; `model_name`: what the service calls the model."""

    model_path: str
    model_name: str
    device: DeviceName = "auto"
    dtype: ModelDtype = "auto"
    decode_compile: DecodeCompile = "auto"
    cpu_weights: CpuWeights = "auto"
    max_model_len: int = 0
    compile_cache_dir: Path | None = None
    apply_chat_template: bool = True


#: The knobs' defaults, for the settings that expose them.
DEFAULTS = EngineConfig(model_path="", model_name="")

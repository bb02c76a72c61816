"""Every knob of the MoE offload engine, in one class that is built once and handed down whole.

The engine reads no environment; the worker's `OffloadSettings` reads this class's fields from `EXPERT_*`
variables, and the mode and the memory budgets by their own names (`OFFLOAD`, `GPU_MEMORY_GB`, ...: each a
validation alias equal to the field's name) because they describe the machine rather than the experts.
"""

from typing import Literal

from pydantic import BaseModel, Field, model_validator

OffloadMode = Literal["auto", "none", "experts"]
ExpertQuant = Literal["nf4", "fp4", "bf16"]
CachePolicyName = Literal["lru", "lfu"]
MissMode = Literal["auto", "copy", "cpu", "hybrid"]
ExpertKernel = Literal["auto", "triton", "torch"]
ExpertDecode = Literal["auto", "host", "graph"]


class OffloadConfig(BaseModel):
    offload: OffloadMode = Field(
        "auto",
        validation_alias="offload",
        description="experts: offload the routed experts of a MoE; none: never; auto: a fused-experts MoE on the "
        "CPU (every expert 4-bit in RAM), or on a GPU when its 16-bit weights exceed GPU_MEMORY_GB",
    )
    gpu_memory_gb: float = Field(
        16.0,
        ge=0,
        validation_alias="gpu_memory_gb",
        description="GPU memory the worker may use (the process is held to it); 0 = all of it",
    )
    gpu_reserve_gb: float = Field(
        1.5,
        ge=0,
        validation_alias="gpu_reserve_gb",
        description="of GPU_MEMORY_GB, what stays free for the KV cache, activations and dequantized experts",
    )
    host_memory_gb: float = Field(
        0.0,
        ge=0,
        validation_alias="host_memory_gb",
        description="host RAM for the quantized expert rows and for converting a checkpoint; 0 = what is free",
    )
    quant: ExpertQuant = Field("nf4", description="expert rows: nf4 or fp4 (4.5 bits per weight), or bf16")
    cache_policy: CachePolicyName = Field(
        "lru", description="which expert leaves a full layer of slots: lru, or lfu (frequency with decay and admission)"
    )
    slots: int = Field(0, ge=0, description="device expert slots per layer; 0 = as many as the budget allows")
    prefetch: bool = Field(True, description="copy the next layer's likely experts while this layer computes")
    misses: MissMode = Field(
        "auto",
        description="an expert with no slot: copy it over the bus, compute it on the CPU, or hybrid (split "
        "by speeds timed at load); auto = hybrid on a GPU, copy on the CPU",
    )
    kernel: ExpertKernel = Field(
        "auto",
        description="decode's experts: triton (fused 4-bit kernels) or torch (dequantize, then multiply); "
        "auto = triton on CUDA where it is installed",
    )
    decode: ExpertDecode = Field(
        "auto",
        description="a compiled decode's experts: graph (the step stays on the device) or host (the host "
        "decides at each MoE layer); auto = graph wherever decode compiles",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> "OffloadConfig":
        if self.gpu_memory_gb and self.gpu_reserve_gb >= self.gpu_memory_gb:
            raise ValueError("GPU_RESERVE_GB must be less than GPU_MEMORY_GB, or no memory is left for weights")
        return self

"""The small interface every engine implements; the worker's tasks only ever talk to this."""

from abc import ABC, abstractmethod
from typing import Protocol

from shared.schemas import ExpertOffloadStats, GenerationOutcome, GenerationParams


class InvalidGenerationInput(ValueError):
    """The request cannot run on this model (e.g. longer than its context); answered as a 400."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GenerationControl(Protocol):
    """How a running generation talks back to whoever started it, once per token."""

    def emit(self, text: str) -> None:
        """New text, already detokenized."""

    def stop_reason(self) -> str | None:
        """None to go on, or why to stop now ("cancelled", "timeout")."""


class SilentControl:
    """A control for runs nobody watches (warm-up, in-process benchmarks): discards text, never stops."""

    def emit(self, text: str) -> None:
        pass

    def stop_reason(self) -> None:
        return None


class Engine(ABC):
    model_name: str
    device: str
    dtype: str
    context_length: int

    @abstractmethod
    def load(self) -> None:
        """Load weights once; called before the worker takes its first job."""

    @abstractmethod
    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationOutcome:
        """Generate, calling `control.emit` per token; raises InvalidGenerationInput for bad input."""

    @abstractmethod
    def memory_used_gb(self) -> float:
        """Memory the model occupies on its device (GPU allocation, or process RSS on the CPU)."""

    def expert_offload_stats(self) -> ExpertOffloadStats | None:
        """The expert cache's counters, for engines that offload MoE experts; None for the rest."""
        return None

"""Engines: one class per way of running a model, all behind `Engine` (load, generate, stats), each configured
by an `EngineConfig` it is handed. The engine is a library: it imports nothing of the worker."""

from worker.engine.base import Engine, GenerationControl, InvalidGenerationInput
from worker.engine.config import EngineConfig

__all__ = ["Engine", "EngineConfig", "GenerationControl", "InvalidGenerationInput"]

"""Engines: one class per way of running a model, all behind `Engine` (load, generate, stats)."""

from worker.engine.base import Engine, GenerationControl, InvalidGenerationInput
from worker.engine.factory import create_engine

__all__ = ["Engine", "GenerationControl", "InvalidGenerationInput", "create_engine"]

"""Pick and build the engine the settings ask for."""

from shared.config import Settings
from worker.engine.base import Engine
from worker.engine.dedicated_thread import DedicatedThreadEngine
from worker.model_store import resolve_model_path


def create_engine(settings: Settings) -> Engine:
    from worker.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(
        model_path=resolve_model_path(settings),
        model_name=settings.model_id,
        device=settings.device,
        dtype=settings.model_dtype,
        apply_chat_template=settings.apply_chat_template,
    )
    return DedicatedThreadEngine(engine)

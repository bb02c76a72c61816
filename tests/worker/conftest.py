import pytest

from worker.engine.config import EngineConfig
from worker.engine.transformers_engine import TransformersEngine


class RecordingControl:
    """Collects emitted text; asks to stop after `stop_after` emits, with `reason`."""

    def __init__(self, stop_after: int | None = None, reason: str = "cancelled"):
        self.pieces: list[str] = []
        self.stop_after = stop_after
        self.reason = reason

    def emit(self, text: str) -> None:
        self.pieces.append(text)

    def stop_reason(self) -> str | None:
        if self.stop_after is not None and len(self.pieces) >= self.stop_after:
            return self.reason
        return None


@pytest.fixture(scope="session")
def engine(bundled_model_path) -> TransformersEngine:
    engine = TransformersEngine(
        EngineConfig(bundled_model_path, "bundled", device="cpu", decode_compile="off", cpu_weights="float")
    )
    engine.load()
    return engine

import pytest

from shared.config import Settings


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    """The bundled SmolLM2, converted once into the model cache (`make model` does it ahead)."""
    from worker.model_store import ensure_bundled_model

    return str(ensure_bundled_model(Settings(_env_file=None).model_cache_dir))

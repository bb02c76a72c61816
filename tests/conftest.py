import os

import pytest

from worker.settings import EngineSettings

# Without a GPU, Triton (a dev dependency) runs the kernels under test in its interpreter. It decides that as
# it is first imported, which torch's compiler does early, so it is set here, before any test module loads.
if os.environ.get("MOE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    """The bundled SmolLM2, converted once into the model cache (`make model` does it ahead)."""
    from worker.model_store import ensure_bundled_model

    return str(ensure_bundled_model(EngineSettings(_env_file=None).model_cache_dir))

"""Run every call of an engine on one long-lived thread.

Measured on 2 CPU cores with the bundled model: generating on a thread other than the one that loaded
and warmed up the model runs at 18 tok/s instead of 28-30 (torch's OpenMP pools of both threads compete
for the cores). Celery's threads pool runs tasks on a thread of its own, so the engine gets a thread of
its own too: load, warm-up and every generation happen there, whichever thread asks.
"""

from concurrent.futures import ThreadPoolExecutor

from shared.schemas import ExpertOffloadStats, GenerationOutcome, GenerationParams
from worker.engine.base import Engine, GenerationControl


class DedicatedThreadEngine(Engine):
    def __init__(self, inner: Engine):
        self.inner = inner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def __getattr__(self, name: str):
        # model_name, device, dtype, context_length... as the wrapped engine has them
        return getattr(self.inner, name)

    def load(self) -> None:
        self._executor.submit(self.inner.load).result()

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationOutcome:
        return self._executor.submit(self.inner.generate, params, control).result()

    def memory_used_gb(self) -> float:
        return self.inner.memory_used_gb()

    def expert_offload_stats(self) -> ExpertOffloadStats | None:
        return self.inner.expert_offload_stats()

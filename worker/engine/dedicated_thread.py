"""Run every call of an engine on one long-lived thread.

Generating on a thread other than the one that loaded and warmed up the model runs markedly slower on a
few CPU cores (torch's OpenMP pools of both threads compete for them). Celery's threads pool runs tasks on a
thread of its own, so the engine gets a thread of its own too: load, warm-up and every generation happen
there, whichever thread asks.
"""

from concurrent.futures import ThreadPoolExecutor

from shared.schemas import ExpertOffloadStats, GenerationOutcome, GenerationParams
from worker.engine.base import Engine, GenerationControl


class DedicatedThreadEngine(Engine):
    def __init__(self, inner: Engine):
        self.inner = inner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._describe()

    def load(self) -> None:
        self._executor.submit(self.inner.load).result()
        self._describe()

    def _describe(self) -> None:
        """What the heartbeat shows, as the wrapped engine has it (the context length is known once loaded)."""
        self.model_name, self.device = self.inner.model_name, self.inner.device
        self.dtype, self.context_length = self.inner.dtype, self.inner.context_length

    def generate(self, params: GenerationParams, control: GenerationControl) -> GenerationOutcome:
        return self._executor.submit(self.inner.generate, params, control).result()

    def memory_used_gb(self) -> float:
        return self.inner.memory_used_gb()

    def expert_offload_stats(self) -> ExpertOffloadStats | None:
        return self.inner.expert_offload_stats()

"""A request's own deadline, on top of the job's: generation stops ("timeout") once it passes."""

import time

from worker.engine.base import GenerationControl


class RequestDeadlineControl:
    """A `GenerationControl` in front of the job's own that also stops at `deadline` (wall-clock, epoch
    seconds: the API sets it, so it is a time both machines read the same way)."""

    def __init__(self, inner: GenerationControl, deadline: float):
        self.inner = inner
        self.deadline = deadline

    def emit(self, text: str) -> None:
        self.inner.emit(text)

    def stop_reason(self) -> str | None:
        reason = self.inner.stop_reason()
        if reason is None and time.time() > self.deadline:
            return "timeout"
        return reason

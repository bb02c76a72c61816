"""A scripted stand-in for the engine, for the API tests: emits fixed text and records the job's params."""

from tests.api.conftest import outcome
from worker.job_runner import JobContext


class ScriptedReply:
    def __init__(
        self,
        pieces: list[str],
        finish_reason: str = "stop",
        stop_sequence: str | None = None,
        tokens: int | None = None,
    ):
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.stop_sequence = stop_sequence
        self.tokens = len(pieces) if tokens is None else tokens
        self.params: list[dict] = []

    def __call__(self, context: JobContext, params: dict) -> tuple[dict, str]:
        self.params.append(params)
        for piece in self.pieces:
            context.emit(piece)
        result = outcome("".join(self.pieces), self.tokens)
        result.update(finish_reason=self.finish_reason, stop_sequence=self.stop_sequence)
        return result, self.finish_reason

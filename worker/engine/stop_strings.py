"""Stop strings, matched on the generated text as it streams.

Text that could still turn out to be the start of a stop string is held back rather than emitted, so a
client never sees part of a stop string; once a stop string is complete, the text before it is released
and everything from it on is dropped.
"""

from worker.engine.base import GenerationControl


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.text = ""  # released so far: what the caller gets
        self.matched: str | None = None
        self._pending = ""  # generated, not yet released

    def push(self, new_text: str) -> str:
        """New generated text -> the part that is now safe to release ("" once a stop string matched)."""
        if self.matched is not None:
            return ""
        pending = self._pending + new_text
        hit = self._earliest_stop(pending)
        if hit is not None:
            start, self.matched = hit
            released, self._pending = pending[:start], ""
        else:
            hold = self._possible_stop_prefix(pending)
            released, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += released
        return released

    def finish(self) -> str:
        """Generation ended without completing a stop string: what was held back is plain text after all."""
        released, self._pending = ("" if self.matched is not None else self._pending), ""
        self.text += released
        return released

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        hits = [(index, stop) for stop in self.stops if (index := text.find(stop)) >= 0]
        return min(hits, default=None)

    def _possible_stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class StopStringControl:
    """A `GenerationControl` in front of the job's own: releases text through a StopStringMatcher and asks
    generation to stop ("stop") once a stop string is complete."""

    def __init__(self, inner: GenerationControl, stops: list[str]):
        self.inner = inner
        self.matcher = StopStringMatcher(stops)

    @property
    def text(self) -> str:
        return self.matcher.text

    @property
    def matched(self) -> str | None:
        return self.matcher.matched

    def emit(self, text: str) -> None:
        released = self.matcher.push(text)
        if released:
            self.inner.emit(released)

    def stop_reason(self) -> str | None:
        if self.matcher.matched is not None:
            return "stop"
        return self.inner.stop_reason()

    def finish(self) -> None:
        released = self.matcher.finish()
        if released:
            self.inner.emit(released)

"""Stop strings, matched on the generated text across token boundaries.

Text is released only once it can no longer be the start of a stop string, so a streamed
client never sees a partial stop string that later turns out to be one. The stop string
itself is never emitted.
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings must be non-empty"
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string completes."""
        if self.stopped:
            return ""
        text = self._held + delta
        cut = self._first_stop(text)
        if cut is not None:
            self._held, self.stopped = "", True
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation, held text was not a stop string after all: release it."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

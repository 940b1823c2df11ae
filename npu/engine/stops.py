"""Stop strings: an answer ends where one of the client's strings would begin, and the
string itself is never sent.

`StopStrings(stops)` takes each text delta as it is decoded and returns what may be sent
now: text that cannot be the start of a stop string is released, a tail that could be is
held back until the next delta decides it. `push(delta)` returns (text to send, stopped);
`flush()` the held tail when the answer ends some other way. Pure: no tokens, no engine.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

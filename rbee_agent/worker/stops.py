"""Stop strings (B43): stream text at once, except a tail that could still become a stop."""

from __future__ import annotations


class StopHoldback:
    """Streams text while holding back any tail that could still begin a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if stop.startswith(text[-k:]):
                    keep = k
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

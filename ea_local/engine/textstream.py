"""Token bytes -> text pieces: UTF-8 safe across token boundaries, stop strings held back."""
from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # text that could still turn into a stop string

    def push(self, data: bytes) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self.pending += self.dec.decode(data)
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out = self.pending + self.dec.decode(b"", final=True)
        self.pending = ""
        return out

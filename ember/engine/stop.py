"""Stop strings over streamed text.

Text that might be the start of a stop string is held back until it either completes the stop string (then it
and everything after it is dropped) or can no longer match (then it is released). So a client never sees a
partial stop string, and sees all text before it.
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string was found)."""
        if self.hit:
            return "", True
        if not self.stops:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            self.hit = True
            return buf[:cut], True
        # hold back the longest suffix of buf that is a proper prefix of some stop string
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """At the end of generation: release held-back text (it never became a stop string)."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out

"""`ember pull NAME`: install a catalogue model, showing progress like Ollama's pull."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from ember.cli.list import human_bytes
from ember.store.catalog import pull

_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1


class ProgressLine:
    """Renders (status, completed, total) events. On a terminal one line per status is redrawn in place;
    elsewhere (logs, pipes) each status is printed once, and a byte count only when it completes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.status: str | None = None
        self.last_draw = 0.0
        self.open_line = False  # a tty line drawn without its newline yet

    def _render(self, status: str, completed: int, total: int) -> str:
        if total <= 0:
            return status
        pct = min(100, completed * 100 // total)
        filled = _BAR_WIDTH * pct // 100
        bar = "█" * filled + " " * (_BAR_WIDTH - filled)
        return f"{status} {pct:3d}% ▕{bar}▏ {human_bytes(completed)}/{human_bytes(total)}"

    def __call__(self, status: str, completed: int, total: int) -> None:
        new = status != self.status
        done = total <= 0 or completed >= total
        if new:
            self.finish()
            self.status = status
        if self.tty:
            now = time.monotonic()
            if new or done or now - self.last_draw >= _REDRAW_SECONDS:
                self.out.write("\r\x1b[K" + self._render(status, completed, total))
                self.out.flush()
                self.open_line = True
                self.last_draw = now
        elif done:
            self.out.write(self._render(status, completed, total) + "\n")
            self.out.flush()
            self.status = None if total > 0 else status  # print a finished byte count once

    def finish(self) -> None:
        if self.open_line:
            self.out.write("\n")
            self.out.flush()
            self.open_line = False


def pull_command(name: str, out: TextIO | None = None) -> int:
    progress = ProgressLine(out or sys.stderr)
    try:
        pull(name, progress=progress)
    finally:
        progress.finish()
    return 0

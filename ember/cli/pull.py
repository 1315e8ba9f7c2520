"""`ember pull NAME [--insecure]`: install a model from the catalogue or a registry, with Ollama-style progress.

`ProgressLine` draws the bars for every store command (pull, push, create); `events` adapts the store's
Ollama-shaped progress objects ({"status", "total", "completed"}) to it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ember.cli.list import human_bytes

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


def events(line: ProgressLine) -> Callable[[dict[str, Any]], None]:
    """A store progress callback (Ollama status objects) that draws on `line`."""

    def on_event(event: dict[str, Any]) -> None:
        line(str(event.get("status", "")), int(event.get("completed") or 0), int(event.get("total") or 0))

    return on_event


def pull_command(name: str, out: TextIO | None = None, insecure: bool = False) -> int:
    from ember.store.registry import pull

    progress = ProgressLine(out or sys.stderr)
    try:
        pull(name, insecure=insecure, progress=events(progress))
    finally:
        progress.finish()
    return 0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `pull` (main.py calls this, as it does for the other command modules)."""
    pull = sub.add_parser(
        "pull", parents=parents, help="fetch a model from the catalogue or a registry",
        description="Fetch a model into the local store: catalogue names (smollm2, gemma3) from Ember's "
                    "offline catalogue, host/namespace/model[:tag] from that registry, other names from "
                    "the registry in $EMBER_REGISTRY. An interrupted pull resumes.")
    pull.add_argument("model", metavar="MODEL")
    pull.add_argument("--insecure", action="store_true", help="use plain HTTP for the registry")
    pull.set_defaults(handler=lambda args: pull_command(args.model, insecure=args.insecure))

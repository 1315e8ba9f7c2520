"""`ember list`: the models in the local store, as Ollama shows them (NAME, ID, SIZE, MODIFIED)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from ember.store.manifests import list_manifests, manifest_id


def human_bytes(n: int) -> str:
    """Decimal units with Ollama's rounding: "98 MB", "2.5 GB"."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if value >= 10 or unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "Less than a second ago"
    for size, unit in ((365 * 86400, "year"), (30 * 86400, "month"), (7 * 86400, "week"), (86400, "day"),
                       (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds >= size:
            n = int(seconds // size)
            if n == 1:
                return f"About a{'n' if unit == 'hour' else ''} {unit} ago" if unit != "second" else "1 second ago"
            return f"{n} {unit}s ago"
    raise AssertionError("unreachable")


def list_command(out: TextIO | None = None) -> int:
    out = out or sys.stdout
    now = time.time()
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    for m in list_manifests():
        rows.append((
            m.name.display,
            manifest_id(m.name).removeprefix("sha256:")[:12],
            human_bytes(m.manifest.size),
            human_ago(now - m.path.stat().st_mtime),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        out.write("    ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "    " + r[3] + "\n")
    return 0

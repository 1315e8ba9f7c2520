"""On-disk cache of repacked weights: the second load of a model memory-maps its kernel-ready tensors.

Repacking GGUF blocks into the kernels' forms (ember.kernels.linear) is the slow part of loading (a 1B Q8_0
model: ~10 s; 3B: ~45 s) and its temporaries set the peak RSS (2-2.5x the file). Its result depends only on
the GGUF bytes and on our packing code, so the first load saves every Linear's tensors to one file and later
loads map that file instead (`torch.load(mmap=True)`): no repacking, no temporaries, and the weights are
clean file-backed pages the kernel can drop and re-read under memory pressure rather than swap.

Key: the GGUF's identity (resolved path, size, mtime), torch's version and CPU capability (the int4 packing
is ISA-specific) and a hash of the packing code's source files, so changing that code or torch invalidates
old entries by itself. A file that fails to load or does not match what the builder asks for is ignored
and rebuilt. Writes go to a temporary name and are renamed into place, so a concurrent or interrupted load
never leaves a partial entry. The directory is kept under a size budget by dropping the least recently
used entries.

Environment: EMBER_PACK_CACHE=0 turns it off; EMBER_CACHE_DIR moves it (default ~/.cache/ember, entries in
its packed/ folder); EMBER_PACK_CACHE_GB is the budget (default 16).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: the store (`ember rm`) calls forget() without loading it
    from ember.kernels.linear import Linear

FORMAT = 1  # bump when the saved layout changes in a way the source hash would not catch
DEFAULT_BUDGET_GB = 16.0


def cache_root() -> Path:
    env = os.environ.get("EMBER_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ember") / "packed"


def enabled() -> bool:
    return os.environ.get("EMBER_PACK_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def _code_hash() -> str:
    """Hash of the sources that decide what a packed tensor holds."""
    import ember.quant as quant
    from ember.kernels import linear as linear_mod
    from ember.kernels import native, qdot

    h = hashlib.sha256()
    files = [Path(linear_mod.__file__), Path(qdot.__file__), native.CSRC / "qdot.cpp"] + sorted(
        Path(quant.__file__).parent.glob("*.py"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


SAMPLE_BYTES = 64 << 10
SAMPLES = 8


def _file_part(gguf_path: Path) -> str:
    """Path, size and mtime, plus a hash of the header, the tail and a few spread samples of the bytes: a
    file rewritten in place with its mtime kept (cp -p, an unpacked archive) still changes its identity in
    all but contrived cases, for a few reads instead of hashing gigabytes."""
    st = gguf_path.stat()
    h = hashlib.sha256("|".join([str(gguf_path.resolve()), str(st.st_size), str(st.st_mtime_ns)]).encode())
    with open(gguf_path, "rb") as fh:
        offsets = [0, max(0, st.st_size - SAMPLE_BYTES)]
        offsets += [st.st_size * (i + 1) // (SAMPLES + 1) for i in range(SAMPLES)]
        for off in offsets:
            fh.seek(off)
            h.update(fh.read(SAMPLE_BYTES if off in offsets[:2] else 4096))
    return h.hexdigest()[:20]


def entry_key(gguf_path: Path) -> str:
    """<file identity>-<torch, CPU and code identity>: the first half alone finds a file's entries."""
    import torch

    from ember.kernels import linear as linear_mod
    from ember.kernels import qdot

    # qdot's availability decides the packed forms (EMBER_NATIVE=0, a CPU without VNNI, no compiler).
    env = "|".join([torch.__version__, torch.backends.cpu.get_cpu_capability(), str(linear_mod.COMPUTE_DTYPE),
                    str(FORMAT), _code_hash(), f"qdot={qdot.available()}"])
    return f"{_file_part(gguf_path)}-{hashlib.sha256(env.encode()).hexdigest()[:12]}"


def forget(gguf_path: Path) -> int:
    """Delete the cache entries of a GGUF about to be removed (`ember rm`); returns how many. Call it while
    the file still exists (its identity comes from stat)."""
    try:
        prefix = _file_part(Path(gguf_path))
    except OSError:
        return 0
    removed = 0
    for f in cache_root().glob(f"{prefix}-*.pt"):
        try:
            f.unlink()
            removed += 1
        except OSError:
            pass
    return removed


class PackCache:
    """One model's entry: `lookup` serves Linears from a previous save, `add` records new ones, `save` writes
    them when the load had to build anything."""

    def __init__(self, path: Path, budget_bytes: int):
        self.path = path
        self.budget_bytes = budget_bytes
        self._saved: dict[str, Any] = {}
        self._new: dict[str, dict[str, Any]] = {}
        self.hits = 0
        if path.exists():
            import torch

            try:
                self._saved = torch.load(path, mmap=True, weights_only=True)
                os.utime(path)  # recency for the LRU budget
            except Exception:  # truncated, foreign or from an incompatible torch: rebuild and overwrite
                self._saved = {}

    @classmethod
    def for_file(cls, gguf_path: Path) -> "PackCache | None":
        """The cache entry for this GGUF, or None when caching is off or the file cannot be identified."""
        if not enabled():
            return None
        try:
            key = entry_key(Path(gguf_path))
        except OSError:
            return None
        budget = float(os.environ.get("EMBER_PACK_CACHE_GB", DEFAULT_BUDGET_GB))
        return cls(cache_root() / f"{key}.pt", int(budget * (1 << 30)))

    def lookup(self, key: str, in_features: int, out_features: int) -> Linear | None:
        from ember.kernels.linear import linear_from_state

        state = self._saved.get(key)
        if state is None:
            return None
        try:
            lin = linear_from_state(state)
        except (KeyError, TypeError, ValueError):
            return None
        if (lin.in_features, lin.out_features) != (in_features, out_features):
            return None
        self.hits += 1
        return lin

    @property
    def pending(self) -> int:
        """Linears built by this load and not yet saved."""
        return len(self._new)

    def add(self, key: str, lin: Linear) -> None:
        self._new[key] = lin.state()

    def save(self) -> None:
        """Write the entry if this load built anything (all Linears of the model, old and new), then keep the
        directory within budget. Failing to write (read-only or full disk) only costs the speed-up."""
        if not self._new:
            return
        import torch

        merged = {**self._saved, **self._new}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".pt")
            with os.fdopen(fd, "wb") as fh:
                torch.save(merged, fh)
            os.replace(tmp, self.path)
        except Exception:  # OSError, or torch's writer failing (RuntimeError) on a full disk
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return
        self._new.clear()
        self._trim()

    def _trim(self) -> None:
        entries = []
        for f in self.path.parent.glob("*.pt"):
            try:
                st = f.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries):  # oldest first; the entry just written is the newest
            if total <= self.budget_bytes or f == self.path:
                break
            try:
                f.unlink()
                total -= size
            except OSError:
                pass

"""The loaded-model manager: which models are in memory, for how long, and who is using them.

    manager = ModelManager(ManagerConfig(max_loaded=2, max_queue=64))
    lease = await manager.acquire("smollm2", keep_alive="10m")   # loads on first use (in a worker thread)
    try: ... lease.model.engine.stream(...) ...
    finally: manager.release(lease)

Rules (Ollama's, see docs/api.md there):
- A model loads on first use and stays loaded `keep_alive` after its last request ends (default 5m; 0 unloads
  as soon as it is idle; a negative value keeps it forever). Durations are seconds or Go-style strings ("5m").
- At most `max_loaded` models, and their estimated memory at most `max_memory` bytes: loading another evicts the
  least recently used idle model first. A model with requests in flight is never evicted; when nothing can be
  evicted the request is refused with 503 (ServerBusyError) rather than queued without bound.
- At most `max_queue` requests in flight across the server (loading, waiting in an engine or running); one
  more is refused with 503 at once.
- A request asking for a different context length (`num_ctx`) reloads the model when it is idle; while it is
  busy the request runs with the loaded context (its prompt is still checked against it: never truncated).

`register()` adds a Modelfile-like alias: another name for a model with its own chat template, system prompt or
default parameters (how a tools-aware template is supplied for a model whose own template has none).

`embed()` turns text into a sentence embedding: the final hidden states (after the output norm, i.e. what the
vocabulary projection reads) mean-pooled over the input's tokens (BOS excluded) and L2-normalized. Generative
models are not trained for this, so the vectors are usable for similarity but not of embedding-model quality.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import anyio
import torch

from ember.errors import ContextOverflowError, EmberError, InvalidParameterError, ModelNotFoundError
from ember.server.errors import APIError, ServerBusyError

DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's 5m
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_EMBED_CHUNK = 512  # tokens per forward pass, as Model.logits: bounds the attention mask


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to stay loaded after the last request; None means forever. Accepts what Ollama does: a number of
    seconds, or a Go duration string ("5m", "1h30m", "300ms", "-1")."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"keep_alive must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # a bare number is seconds
        except ValueError:
            parts = _DURATION_RE.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidParameterError(
                    f"keep_alive must be a duration like '5m', '1h' or a number of seconds, got {value!r}"
                ) from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise InvalidParameterError(f"keep_alive must be a duration, got {value!r}")
    if not math.isfinite(seconds):
        raise InvalidParameterError(f"keep_alive must be finite, got {value!r}")
    return None if seconds < 0 else seconds


def rfc3339(ts: float) -> str:
    """Wall-clock seconds as RFC 3339 with microseconds and Z, the shape Go clients parse (Ollama's times)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def human_count(n: int) -> str:
    """Parameter count as Ollama's parameter_size: "135M", "7.2B"."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


@dataclass(frozen=True)
class ModelSpec:
    """A Modelfile-like alias: `source` (a store name or GGUF path) with overrides."""

    source: str
    template: str | None = None  # Jinja chat template replacing the GGUF's own
    system: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)  # default options (api.Model.defaults)


@dataclass
class ManagerConfig:
    keep_alive: float | None = DEFAULT_KEEP_ALIVE
    max_loaded: int = 3  # Ollama's default for CPU
    max_memory: int = 0  # bytes; 0: 80% of physical memory
    max_queue: int = 512  # Ollama's OLLAMA_MAX_QUEUE
    threads: int | None = None  # torch threads per model; None: Ember's default
    n_ctx: int | None = None  # default context length; None: the model's (api.DEFAULT_CTX at most)
    speculative: str | None = None  # none | ngram | draft; None: draft for models with a DRAFT, else none

    def __post_init__(self) -> None:
        if self.max_memory <= 0:
            self.max_memory = int(_physical_memory() * 0.8)
        if self.speculative not in (None, "none", "ngram", "draft"):
            raise InvalidParameterError(f"speculative must be none, ngram or draft, got {self.speculative!r}")
        for name in ("max_loaded", "max_queue"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be >= 1, got {getattr(self, name)}")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


@dataclass
class LoadedModel:
    name: str  # canonical: "smollm2:latest", or the resolved path of a file
    model: Any  # ember.api.Model
    digest: str  # hex, no "sha256:" (Ollama's /api/ps)
    size: int  # estimated bytes in memory: weights file + KV cache
    details: dict[str, Any]
    load_seconds: float
    keep_alive: float | None
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall clock; None while busy or when kept forever
    active: int = 0
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    def embed(self, text_or_ids: str | list[int], truncate: bool = False) -> tuple[list[float], int]:
        """(unit-norm embedding, number of tokens). Thread-safe; runs in the caller's thread."""
        m = self.model
        ids = m.tokenize(text_or_ids) if isinstance(text_or_ids, str) else [int(t) for t in text_or_ids]
        if not ids:
            raise InvalidParameterError("cannot embed an empty input")
        if len(ids) > m.n_ctx:
            if not truncate:
                raise ContextOverflowError(
                    f"input of {len(ids)} tokens does not fit the context window of {m.n_ctx} tokens"
                )
            ids = ids[: m.n_ctx]
        n_vocab = m.config.n_vocab
        if any(not 0 <= t < n_vocab for t in ids):
            raise InvalidParameterError(f"token ids must be in 0..{n_vocab - 1}")
        with self.embed_lock:
            vec = _mean_pooled_hidden(m, ids)
        return vec.tolist(), len(ids)


@torch.inference_mode()
def _mean_pooled_hidden(m: Any, ids: list[int]) -> torch.Tensor:
    t = m.model  # the Transformer: run its blocks, stop before the vocabulary projection
    skip_bos = len(ids) > 1 and ids[0] == m.tokenizer.bos_id  # same vector for every input: only dilutes
    cache = t.new_cache(len(ids))
    total = torch.zeros(t.config.n_embd, dtype=torch.float32)
    for start in range(0, len(ids), _EMBED_CHUNK):
        chunk = ids[start : start + _EMBED_CHUNK]
        positions = torch.arange(start, start + len(chunk))
        x = t.embedding(torch.tensor(chunk, dtype=torch.long))
        if t.config.embed_scale != 1.0:
            x = x * t.config.embed_scale
        for block in t.blocks:
            x = block(x, positions, cache)
        h = t.norm(x).float()
        if start == 0 and skip_bos:
            h = h[1:]
        total += h.sum(0)
    mean = total / (len(ids) - int(skip_bos))
    return mean / mean.norm().clamp_min(1e-12)


class ModelManager:
    def __init__(self, config: ManagerConfig | None = None):
        self.config = config or ManagerConfig()
        self.loaded: dict[str, LoadedModel] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.in_flight = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._expiry_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # -- names ------------------------------------------------------------------------------------------------
    def register(self, name: str, spec: ModelSpec) -> str:
        """Add an alias (see module doc); returns its canonical name. Must be called before serving it."""
        key = self.canonical(name)
        if spec.template is not None:
            from ember.tokenizer.chat_template import ChatTemplate

            ChatTemplate(spec.template)  # fail now, not on first use
        self.specs[key] = spec
        return key

    @staticmethod
    def canonical(name: Any) -> str:
        from ember.store import _looks_like_path
        from ember.store.names import parse_name

        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "model is required", param="model")
        text = name.strip()
        if _looks_like_path(text):
            return str(Path(text).expanduser().resolve())
        try:
            return parse_name(text).display
        except ModelNotFoundError as e:
            raise APIError(400, str(e), param="model") from None

    # -- leases -----------------------------------------------------------------------------------------------
    async def acquire(self, name: str, keep_alive: Any = None, num_ctx: int | None = None) -> LoadedModel:
        """Admit a request for `name` and return its loaded model (loading it first if need be). Every
        successful acquire must be paired with release()."""
        key = self.canonical(name)
        ka = self.config.keep_alive if keep_alive is None else parse_keep_alive(keep_alive)
        if num_ctx is not None and (isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 8):
            raise InvalidParameterError(f"num_ctx must be an integer >= 8, got {num_ctx!r}")
        if self.in_flight >= self.config.max_queue:
            raise ServerBusyError(
                f"server busy, please try again: maximum pending requests exceeded ({self.config.max_queue})"
            )
        self.in_flight += 1
        try:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:  # concurrent first requests for a model load it once
                lm = self.loaded.get(key)
                if lm is not None and num_ctx is not None and num_ctx != lm.n_ctx and lm.active == 0:
                    await self._unload(lm)
                    lm = None
                if lm is None:
                    lm = await self._load(key, num_ctx)
                lm.active += 1
                lm.keep_alive = ka
                lm.expires_at = None
                lm.last_used = time.monotonic()
                return lm
        except BaseException:
            self.in_flight -= 1
            raise

    def release(self, lm: LoadedModel) -> None:
        self.in_flight -= 1
        lm.active -= 1
        lm.last_used = time.monotonic()
        if lm.active == 0:
            if lm.keep_alive is None:
                lm.expires_at = None
            else:
                lm.expires_at = time.time() + lm.keep_alive
        self._kick()

    async def unload_if_idle(self, lm: LoadedModel) -> None:
        """keep_alive 0 (`ember stop`): unload now if nothing uses the model, else when its last request ends."""
        lm.keep_alive = 0.0
        async with self._locks.setdefault(lm.name, asyncio.Lock()):
            if lm.active == 0 and self.loaded.get(lm.name) is lm:
                await self._unload(lm)

    # -- loading and eviction -----------------------------------------------------------------------------------
    async def _load(self, key: str, num_ctx: int | None) -> LoadedModel:
        spec = self.specs.get(key)
        source = spec.source if spec else key
        estimate = await anyio.to_thread.run_sync(_estimate_bytes, source)
        await self._make_room(key, estimate)
        lm = await anyio.to_thread.run_sync(self._load_sync, key, source, spec, num_ctx or self.config.n_ctx)
        self.loaded[key] = lm
        return lm

    def _load_sync(self, key: str, source: str, spec: ModelSpec | None, n_ctx: int | None) -> LoadedModel:
        import ember
        from ember.tokenizer.chat_template import ChatTemplate

        t0 = time.perf_counter()
        from ember.store import resolve_model

        speculative = self.config.speculative
        if speculative == "draft" and resolve_model(source).draft_path is None:
            speculative = None  # the server-wide setting only applies to models that have a DRAFT
        m = ember.load(source, n_ctx=n_ctx, threads=self.config.threads, speculative=speculative)
        if spec is not None:
            if spec.template is not None:
                m.template = ChatTemplate(spec.template, m.template.bos_token, m.template.eos_token)
            if spec.system is not None:
                m.system = spec.system
            m.defaults.update(spec.parameters)
            m.name = key
        m.engine.start_background()
        info = m.info()
        kv_bytes = m.engine.config.kv_cache_bytes
        return LoadedModel(
            name=key, model=m, digest=_digest(source), size=int(info["file_size"]) + kv_bytes,
            details=details_from_info(info), load_seconds=time.perf_counter() - t0,
            keep_alive=self.config.keep_alive,
        )

    async def _make_room(self, key: str, estimate: int) -> None:
        def over() -> bool:
            used = sum(lm.size for lm in self.loaded.values())
            return len(self.loaded) >= self.config.max_loaded or used + estimate > self.config.max_memory

        while over():
            idle = [lm for lm in self.loaded.values() if lm.active == 0]
            if not idle:
                if not self.loaded:
                    raise APIError(500, f"model '{key}' needs about {estimate >> 20} MiB, more than the memory "
                                        f"budget of {self.config.max_memory >> 20} MiB (EMBER_MAX_MEMORY)")
                raise ServerBusyError(f"server busy, please try again: every loaded model is in use and "
                                      f"'{key}' does not fit beside them")
            await self._unload(min(idle, key=lambda lm: lm.last_used))  # least recently used first

    async def _unload(self, lm: LoadedModel) -> None:
        if self.loaded.get(lm.name) is lm:
            del self.loaded[lm.name]
        await anyio.to_thread.run_sync(_close, lm)

    async def unload_all(self) -> None:
        for lm in list(self.loaded.values()):
            await self._unload(lm)

    # -- keep_alive expiry --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the expiry loop on the running event loop (the app's lifespan calls this)."""
        self._wake = asyncio.Event()
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            try:
                await self._expiry_task
            except asyncio.CancelledError:
                pass
            self._expiry_task = None
        await self.unload_all()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _expire_loop(self) -> None:
        assert self._wake is not None
        while True:
            now = time.time()
            for lm in list(self.loaded.values()):
                if lm.active == 0 and lm.expires_at is not None and lm.expires_at <= now:
                    lock = self._locks.setdefault(lm.name, asyncio.Lock())
                    async with lock:
                        if lm.active == 0 and self.loaded.get(lm.name) is lm:
                            await self._unload(lm)
            deadlines = [lm.expires_at for lm in self.loaded.values() if lm.active == 0 and lm.expires_at]
            timeout = max(0.0, min(deadlines) - time.time()) if deadlines else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # -- descriptions -------------------------------------------------------------------------------------------
    def running(self) -> list[LoadedModel]:
        return sorted(self.loaded.values(), key=lambda lm: lm.last_used, reverse=True)


def details_from_info(info: Mapping[str, Any]) -> dict[str, Any]:
    arch = str(info.get("architecture", ""))
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": human_count(int(info.get("parameters", 0))),
            "quantization_level": str(info.get("quantization", ""))}


def _estimate_bytes(source: str) -> int:
    """Weights file + the engine's minimum KV cache (api.Model sizes it at >= 256 MiB)."""
    from ember.store import resolve_model

    path = resolve_model(source).path  # also fetches a catalogue model on first use, as ember.load would
    return Path(path).stat().st_size + (256 << 20)


def _digest(source: str) -> str:
    from ember.store import _looks_like_path
    from ember.store.manifests import manifest_id
    from ember.store.names import parse_name

    if _looks_like_path(source):
        return ""
    try:
        return manifest_id(parse_name(source)).removeprefix("sha256:")
    except (EmberError, OSError):
        return ""


def _close(lm: LoadedModel) -> None:
    lm.model.engine.stop_background(timeout=30)
    lm.model.close()


# -- the store, as /api/tags and /v1/models list it -------------------------------------------------------------
def installed_models(manager: ModelManager) -> list[dict[str, Any]]:
    """Models in the store plus registered aliases: name, modified (wall-clock s), size, digest, details."""
    from ember.store.blobs import blob_path
    from ember.store.manifests import list_manifests, manifest_id

    out: list[dict[str, Any]] = []
    sources: dict[str, dict[str, Any]] = {}
    for m in list_manifests():
        details: dict[str, Any] = {"parent_model": "", "format": "gguf", "family": "", "families": None,
                                   "parameter_size": "", "quantization_level": ""}
        try:
            config = json.loads(blob_path(m.manifest.config.digest).read_bytes())
            details.update(family=config.get("model_family", ""), families=config.get("model_families"),
                           parameter_size=config.get("model_type", ""),
                           quantization_level=config.get("file_type", ""))
        except (OSError, ValueError, EmberError, AttributeError):
            pass  # a hand-made manifest without a readable config still lists
        try:
            digest = manifest_id(m.name).removeprefix("sha256:")
            modified = m.path.stat().st_mtime
        except OSError:
            continue
        entry = {"name": m.name.display, "modified": modified, "size": m.manifest.size, "digest": digest,
                 "details": details}
        sources[m.name.display] = entry
        out.append(entry)
    for alias, spec in manager.specs.items():
        base = sources.get(ModelManager.canonical(spec.source)) if not spec.source.endswith(".gguf") else None
        size = base["size"] if base else 0
        if base is None:
            try:
                size = Path(spec.source).stat().st_size
            except OSError:
                pass
        out.append({"name": alias, "modified": base["modified"] if base else time.time(), "size": size,
                    "digest": base["digest"] if base else "",
                    "details": dict(base["details"]) if base else {"format": "gguf"}})
    return out

"""From an open GGUF file to a ready Transformer: config from metadata, then the architecture's builder."""
from __future__ import annotations

from typing import Callable

from ember.errors import UnsupportedError
from ember.model import gemma3, llama
from ember.model.config import ModelConfig, config_from_metadata
from ember.model.pack_cache import PackCache
from ember.model.transformer import Transformer
from ember.model.weights import Weights

BUILDERS: dict[str, Callable[[ModelConfig, Weights, int], Transformer]] = {
    "llama": llama.build,
    "gemma3": gemma3.build,
}


def load_transformer(gguf_file, n_ctx: int, config: ModelConfig | None = None, pack_cache: bool = True) -> Transformer:
    """Build the model of `gguf_file` with rope tables sized for `n_ctx` positions. pack_cache: reuse and
    record repacked weights on disk (ember.model.pack_cache; EMBER_PACK_CACHE=0 turns it off everywhere)."""
    config = config or config_from_metadata(gguf_file.metadata)
    builder = BUILDERS.get(config.family)
    if builder is None:
        raise UnsupportedError(f"unsupported architecture {config.architecture!r}")
    cache = PackCache.for_file(gguf_file.path) if pack_cache else None
    model = builder(config, Weights(gguf_file, cache), n_ctx)
    if cache is None:
        model.weights_source = "repacked"
    else:
        model.weights_source = "pack cache" if cache.hits and not cache.pending else "repacked, saved to pack cache"
        cache.save()
    return model

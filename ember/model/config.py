"""Model hyper-parameters read from GGUF metadata into one validated dataclass.

Everything an architecture needs is decided here, once, from the metadata: head sizes, rope flavour and base,
which layers use a sliding window, norm/activation kinds. The model files then read fields and never look at
metadata themselves. Values that come from a file are untrusted: every field is range-checked so a crafted
file cannot ask for a 10^12-element buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ember.errors import GGUFError, UnsupportedError

# How each supported architecture differs from plain llama. Format knowledge lives in this table, not in code.
#   rope: "norm" rotates adjacent pairs (x[2i], x[2i+1]) - llama's GGUF converter permutes Q/K for it;
#         "neox" rotates the two halves of the head (x[i], x[i + d/2]).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(rope="norm", activation="silu", family="llama"),
    "mistral": dict(rope="norm", activation="silu", family="llama"),
    "qwen2": dict(rope="neox", activation="silu", family="llama"),
    "gemma3": dict(rope="neox", activation="gelu_tanh", family="gemma3"),
}

# Limits on what a file may ask for. Generous for real models (405B-class shapes fit), small enough that a
# crafted value cannot make Ember allocate absurd buffers before it notices.
_MAX_DIM = 1 << 20
_MAX_LAYERS = 1024
_MAX_VOCAB = 1 << 22
_MAX_CTX = 1 << 24


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding of one kind of layer."""

    base: float
    dim: int  # number of leading head dimensions rotated
    style: str  # "norm" | "neox"
    scale: float = 1.0  # linear position scaling: position / scale

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 1.0):
            raise GGUFError(f"invalid rope frequency base {self.base}")
        if self.dim <= 0 or self.dim % 2:
            raise GGUFError(f"invalid rope dimension count {self.dim}")
        if self.style not in ("norm", "neox"):
            raise UnsupportedError(f"unsupported rope style {self.style!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise GGUFError(f"invalid rope scaling factor {self.scale}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # size of one query/key head
    value_dim: int  # size of one value head
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope: RopeConfig
    activation: str = "silu"
    family: str = "llama"
    rope_local: RopeConfig | None = None  # rope of sliding-window layers when it differs (gemma3)
    sliding_window: int = 0  # 0 = no sliding-window layers
    swa_layers: tuple[bool, ...] = ()  # per layer: attends only within the window
    attn_scale: float = 0.0  # multiplier of q.k; 0 means 1/sqrt(head_dim)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedError(f"unsupported architecture {self.architecture!r}")
        for name, value, hi in (
            ("vocabulary size", self.n_vocab, _MAX_VOCAB),
            ("embedding length", self.n_embd, _MAX_DIM),
            ("block count", self.n_layer, _MAX_LAYERS),
            ("head count", self.n_head, _MAX_DIM),
            ("kv head count", self.n_head_kv, _MAX_DIM),
            ("head size", self.head_dim, _MAX_DIM),
            ("value head size", self.value_dim, _MAX_DIM),
            ("feed-forward length", self.n_ff, _MAX_DIM),
            ("context length", self.n_ctx_train, _MAX_CTX),
        ):
            if not isinstance(value, int) or not 1 <= value <= hi:
                raise GGUFError(f"invalid {name}: {value!r}")
        if self.n_head % self.n_head_kv:
            raise GGUFError(f"head count {self.n_head} is not a multiple of kv head count {self.n_head_kv}")
        if not (math.isfinite(self.rms_eps) and 0 < self.rms_eps < 1):
            raise GGUFError(f"invalid rms epsilon {self.rms_eps}")
        if self.rope.dim > self.head_dim:
            raise GGUFError(f"rope dimension {self.rope.dim} exceeds head size {self.head_dim}")
        if self.swa_layers and len(self.swa_layers) != self.n_layer:
            raise GGUFError("sliding-window layer pattern does not match the block count")
        if self.sliding_window < 0 or self.sliding_window > _MAX_CTX:
            raise GGUFError(f"invalid sliding window {self.sliding_window}")

    @property
    def q_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]

    def rope_for(self, layer: int) -> RopeConfig:
        if self.rope_local is not None and self.is_swa(layer):
            return self.rope_local
        return self.rope


def _get(md: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in md:
        if default is ...:
            raise GGUFError(f"missing metadata key {key!r}")
        return default
    value = md[key]
    # Per-layer arrays (e.g. head_count_kv varying per layer) are not supported by this engine yet.
    if hasattr(value, "__len__") and not isinstance(value, str):
        raise UnsupportedError(f"per-layer metadata {key!r} is not supported")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GGUFError(f"metadata key {key!r} has the wrong type ({type(value).__name__})")
    return value


def config_from_metadata(md: Mapping[str, Any], n_vocab: int | None = None) -> ModelConfig:
    """Build the config of a GGUF file from its metadata (keys prefixed by the architecture name)."""
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("metadata has no general.architecture string")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    traits = ARCHITECTURES[arch]
    p = f"{arch}."
    n_embd = _get(md, p + "embedding_length", int)
    n_head = _get(md, p + "attention.head_count", int)
    if n_head <= 0:
        raise GGUFError(f"invalid head count {n_head}")
    n_head_kv = _get(md, p + "attention.head_count_kv", int, n_head)
    head_dim = _get(md, p + "attention.key_length", int, n_embd // n_head if n_embd % n_head == 0 else 0)
    value_dim = _get(md, p + "attention.value_length", int, head_dim)
    n_layer = _get(md, p + "block_count", int)
    if n_vocab is None:
        # As llama.cpp: the vocabulary is the token list; {arch}.vocab_size only matters without one.
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else _get(md, p + "vocab_size", int, 0)

    rope_dim = _get(md, p + "rope.dimension_count", int, head_dim)
    scaling_type = md.get(p + "rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling_type == "linear":
        rope_scale = _get(md, p + "rope.scaling.factor", float, 1.0)
    elif scaling_type not in ("none", None):
        # YaRN and friends change attention temperature as well as frequencies; until implemented and checked
        # against llama.cpp, refuse rather than silently generate worse text.
        raise UnsupportedError(f"unsupported rope scaling type {scaling_type!r}")
    rope = RopeConfig(
        base=_get(md, p + "rope.freq_base", float, 10000.0), dim=rope_dim, style=traits["rope"], scale=rope_scale
    )

    kwargs: dict[str, Any] = {}
    if traits["family"] == "gemma3":
        window = _get(md, p + "attention.sliding_window", int, 0)
        # Gemma 3: five local (sliding-window) layers then one global layer; local layers use rope base 10000
        # without scaling. llama.cpp: is_swa(il) = (il + 1) % 6 != 0.
        pattern = 6
        kwargs.update(
            sliding_window=window,
            swa_layers=tuple((i + 1) % pattern != 0 for i in range(n_layer)) if window else (),
            rope_local=RopeConfig(base=10000.0, dim=rope_dim, style=traits["rope"]),
            embed_scale=math.sqrt(n_embd),
            # Gemma 3 scales queries by 1/sqrt(query_pre_attn_scalar); for the released sizes but 27B that is
            # the head size (llama.cpp's f_attention_scale).
            attn_scale=1.0 / math.sqrt(head_dim),
        )
    elif p + "attention.sliding_window" in md:
        window = _get(md, p + "attention.sliding_window", int, 0)
        if window:
            kwargs.update(sliding_window=window, swa_layers=tuple(True for _ in range(n_layer)))

    return ModelConfig(
        architecture=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        value_dim=value_dim,
        n_ff=_get(md, p + "feed_forward_length", int),
        n_ctx_train=_get(md, p + "context_length", int, 2048),
        rms_eps=_get(md, p + "attention.layer_norm_rms_epsilon", float, 1e-5),
        rope=rope,
        activation=traits["activation"],
        family=traits["family"],
        name=str(md.get("general.name", "")),
        **kwargs,
    )

"""llama.cpp's per-tensor type choice ("quantization mix") for each file type, as llama-quant.cpp makes it
(llama_tensor_get_type, tensor_allows_quantization, tensor_type_fallback; llama.cpp as vendored by
llama-cpp-python 0.3.36). Only the file types Ember can write are implemented; no imatrix, no --pure, no
per-tensor overrides (llama-quantize's defaults).

File types (llama_ftype; the value is written to general.file_type):

| name    | ftype | default type | name    | ftype | default type | name    | ftype | default type |
|---------|-------|--------------|---------|-------|--------------|---------|-------|--------------|
| F32     |   0   | F32          | Q5_1    |   9   | Q5_1         | Q4_K_S  |  14   | Q4_K         |
| F16     |   1   | F16          | Q8_0    |   7   | Q8_0         | Q4_K_M  |  15   | Q4_K         |
| BF16    |  32   | BF16         | Q2_K    |  10   | Q2_K         | Q5_K_S  |  16   | Q5_K         |
| Q4_0    |   2   | Q4_0         | Q3_K_S  |  11   | Q3_K         | Q5_K_M  |  17   | Q5_K         |
| Q4_1    |   3   | Q4_1         | Q3_K_M  |  12   | Q3_K         | Q6_K    |  18   | Q6_K         |
| Q5_0    |   8   | Q5_0         | Q3_K_L  |  13   | Q3_K         |         |       |              |

Which tensors are quantized at all (otherwise they keep their type, e.g. F32 norms): 2-D or higher (ggml_n_dims,
trailing 1s ignored), name ending in "weight", and none of the exclusions in NEVER_QUANTIZED (norms, MoE routers,
positional embeddings, conv1d / RWKV / multimodal special cases). F16/BF16/F32 file types give every such tensor
the default type. For the quantized ones, the rules below then pick a type by role ("category", from the name),
then a row length that does not fit the type's block falls back:

| category                          | rule by file type (others keep the default type)                            |
|-----------------------------------|-----------------------------------------------------------------------------|
| output.weight, or token_embd when | Q8_0 if falcon or rows % block != 0; else Q6_K unless the type is Q8_0      |
| there is no output.weight (tied)  |                                                                             |
| attn_v / attn_qkv / attn_kv_b     | Q2_K: Q4_K if n_gqa >= 4 else Q3_K; Q3_K_M: Q5_K for the first 2, then      |
| (counter i over these tensors)    | Q4_K; Q3_K_L: Q5_K; Q4_K_M, Q5_K_M: Q6_K if use_more_bits(i, n);            |
|                                   | Q4_K_S: Q5_K for i < 4. Then 70B models: Q3_K/Q4_K -> Q5_K; 8 experts: Q8_0 |
| attn_k                            | 8 experts: Q8_0                                                             |
| ffn_down (layer i of n)           | Q2_K: Q3_K; Q3_K_M: Q5_K if i < n/16, else Q4_K (falcon: Q4_K only if       |
|                                   | use_more_bits, else Q3_K); Q3_K_L: Q5_K (falcon Q4_K); Q4_K_M: Q6_K if      |
|                                   | use_more_bits (falcon: Q6_K if i < n/16, Q5_K if use_more_bits);            |
|                                   | Q5_K_M: Q6_K if use_more_bits; Q4_K_S: Q5_K if i < n/8 (not falcon)         |
| attn_output                       | not falcon, 8 experts: Q5_K for Q2_K, Q3_K_S/M, Q4_K_S/M; not falcon        |
|                                   | otherwise: Q2_K: Q3_K, Q3_K_M: Q4_K, Q3_K_L: Q5_K; falcon: Q3_K_L: Q4_K     |

use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division): the first and last eighth
of the layers and every third layer in between. The counters follow llama.cpp's tensor order - sorted by
(layer number of "blk.N.", -1 for none; then name) - and the ffn_down layer is the running count of ffn_down
tensors (MoE models: the N of "blk.N."). n_gqa = n_head / n_head_kv of layer 0.

Fallbacks when rows are not a multiple of the chosen type's block (llama.cpp's current table):

| chosen              | falls back to | and if rows are not a multiple of 32 either |
|---------------------|---------------|---------------------------------------------|
| Q2_K, Q3_K          | Q4_0          | F16                                         |
| Q4_K                | Q5_0          | F16                                         |
| Q5_K                | Q5_1          | F16                                         |
| Q6_K                | Q8_0          | F16                                         |
| a 32-block type     | (itself)      | F16                                         |

(Older llama.cpp sent Q2_K/Q3_K to IQ4_NL; the vendored one no longer does, so Ember needs no IQ4_NL quantizer.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from gguf import GGMLQuantizationType as T

from ember.errors import GGUFError, InvalidParameterError, UnsupportedError
from ember.quant.formats import format_of


@dataclass(frozen=True)
class FileType:
    """A llama_ftype: `name` as llama-quantize spells it (LLAMA_FTYPE_MOSTLY_<name>; ALL_F32 is "F32")."""

    name: str
    ftype: int
    default: T


# The table above, as data.
FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    FileType("F32", 0, T.F32),
    FileType("F16", 1, T.F16),
    FileType("BF16", 32, T.BF16),
    FileType("Q4_0", 2, T.Q4_0),
    FileType("Q4_1", 3, T.Q4_1),
    FileType("Q5_0", 8, T.Q5_0),
    FileType("Q5_1", 9, T.Q5_1),
    FileType("Q8_0", 7, T.Q8_0),
    FileType("Q2_K", 10, T.Q2_K),
    FileType("Q3_K_S", 11, T.Q3_K),
    FileType("Q3_K_M", 12, T.Q3_K),
    FileType("Q3_K_L", 13, T.Q3_K),
    FileType("Q4_K_S", 14, T.Q4_K),
    FileType("Q4_K_M", 15, T.Q4_K),
    FileType("Q5_K_S", 16, T.Q5_K),
    FileType("Q5_K_M", 17, T.Q5_K),
    FileType("Q6_K", 18, T.Q6_K),
)}

# llama.cpp file types Ember does not write (they need IQ/TQ/MXFP4 quantizers or an importance matrix).
NOT_IMPLEMENTED = ("Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS",
                   "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "NVFP4", "Q1_0", "Q2_0")

# ggml types stored as plain numbers (ggml_is_quantized is false for these).
UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64})


def file_type(name: str) -> FileType:
    """Look up a file type by llama.cpp name (case-insensitive; "MOSTLY_"/"LLAMA_FTYPE_" prefixes allowed)."""
    key = name.strip().upper().removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    if key in NOT_IMPLEMENTED:
        raise UnsupportedError(f"quantization type {key} is not implemented in Ember; "
                               f"choose one of: {', '.join(FILE_TYPES)}")
    raise InvalidParameterError(f"unknown quantization type {name!r}; choose one of: {', '.join(FILE_TYPES)}")


class Category(Enum):
    """llama-quant.cpp's tensor_category: a tensor's role, from its name."""

    TOKEN_EMBD = "token_embd"
    ATTENTION_Q = "attn_q"
    ATTENTION_V = "attn_v"
    ATTENTION_K = "attn_k"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# (substring, category), first match wins - after the exact names output.weight / token_embd.weight.
_CATEGORY_SUBSTRINGS: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", Category.ATTENTION_QKV),
    ("attn_kv_b.weight", Category.ATTENTION_KV_B),
    ("attn_v.weight", Category.ATTENTION_V),
    ("attn_k.weight", Category.ATTENTION_K),
    ("attn_q.weight", Category.ATTENTION_Q),
    ("attn_output.weight", Category.ATTENTION_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
_ATTN_V_LIKE = frozenset({Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B})


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return Category.OTHER


# Substrings that keep a tensor out of quantization (tensor_allows_quantization), and why.
NEVER_QUANTIZED: tuple[str, ...] = (
    "_norm.weight",                                   # norms
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight",  # MoE routers / routing tables
    "altup", "laurel", "per_layer_model_proj",         # gemma3n: tiny or not worth it
    "ssm_conv1d", "shortconv.conv.weight",             # small conv1d weights
    "indexer.k_proj.weight", "indexer.q_proj.weight",  # tiny indexer projections
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",  # RWKV
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",                               # T5 relative position bias
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",  # multimodal / audio
)
NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
_GLM5_NEXT_KEEP = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                   "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                   "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                   "attn_v_b.weight")


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (at least 1)."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: Sequence[int], arch: str) -> bool:
    """tensor_allows_quantization. `shape` is the ggml shape (shape[0] = row length)."""
    if n_dims(shape) < 2:
        return False
    # C++: name.rfind("weight") == name.size() - 6, in size_t - also true for any 5-byte name (npos == -1).
    size = len(name.encode())
    if not (name.endswith("weight") or size == 5):
        return False
    if name in NEVER_QUANTIZED_NAMES or any(s in name for s in NEVER_QUANTIZED):
        return False
    if arch == "glm5-next" and any(s in name for s in _GLM5_NEXT_KEEP):
        return False
    return True


# Architectures and layer counts that llama.cpp labels LLM_TYPE_70B (the only model size the mix looks at).
_70B_LAYERS: dict[str, int] = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the mix reads."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        if _70B_LAYERS.get(self.arch) != self.n_layer:
            return False
        if self.arch == "llama":  # llama: 8-expert models are sized 8x7B/8x22B; 80 layers without GQA is 65B
            return self.n_expert != 8 and self.n_head != self.n_head_kv
        return True

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ModelInfo:
        arch = md.get("general.architecture", "")

        def first(key: str, default: int) -> int:
            v = md.get(f"{arch}.{key}", default)
            if hasattr(v, "__len__"):  # per-layer arrays: llama.cpp's n_gqa() looks at layer 0
                v = v[0] if len(v) else default
            return int(v)

        n_layer = first("block_count", 0)
        if n_layer <= 0:
            raise GGUFError(f"metadata {arch}.block_count is missing or 0; cannot choose quantization types")
        n_head = first("attention.head_count", 0)
        return cls(arch, n_layer, n_head, first("attention.head_count_kv", n_head), first("expert_count", 0))


_BLK = re.compile(r"blk\.\s*([+-]?\d+)\.")


def layer_of(name: str) -> int | None:
    """The N of a leading "blk.N." (sscanf("blk.%d.")), or None."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def llama_order(names: Sequence[str]) -> list[str]:
    """Tensor names in llama.cpp's order (its weights map: by layer number, -1 first, then bytewise name)."""
    def key(n: str) -> tuple[int, bytes]:
        layer = layer_of(n)
        return (-1 if layer is None else layer, n.encode())
    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def fallback(row_len: int, qtype: T) -> T:
    """tensor_type_fallback: a type whose block fits rows of `row_len`."""
    block = format_of(qtype).block_size
    if row_len % block == 0:
        return qtype
    table = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
    out = table.get(qtype)
    if out is None:
        if block > 32:
            raise UnsupportedError(f"no fallback type for {qtype.name} with rows of {row_len}")
        out = qtype
    return out if row_len % format_of(out).block_size == 0 else T.F16


@dataclass
class _Counters:
    """quantize_state_impl's running counters."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    n_ffn_down: int = 0
    i_ffn_down: int = 0
    n_ffn_gate: int = 0
    i_ffn_gate: int = 0
    n_ffn_up: int = 0
    i_ffn_up: int = 0
    tied_embeddings: bool = True


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order
    src_type: T
    dst_type: T
    fell_back: bool = False  # rows did not fit the type the rules chose (llama.cpp warns about these)

    @property
    def convert(self) -> bool:
        return self.src_type != self.dst_type


def choose_types(tensors: Sequence[tuple[str, Sequence[int], T]], ft: FileType, model: ModelInfo,
                 ) -> list[TensorPlan]:
    """The type of every tensor, in llama.cpp's order. `tensors`: (name, ggml shape, current type)."""
    by_name = {name: (tuple(shape), t) for name, shape, t in tensors}
    order = llama_order(list(by_name))
    c = _Counters()
    for name in order:
        cat = category(name)
        if cat in _ATTN_V_LIKE:
            c.n_attention_wv += 1
        if cat == Category.OUTPUT:
            c.tied_embeddings = False
    c.n_ffn_down = c.n_ffn_gate = c.n_ffn_up = model.n_layer
    plans = []
    for name in order:
        shape, src = by_name[name]
        dst, fell_back = src, False
        if allows_quantization(name, shape, model.arch):
            dst = ft.default
            if dst not in UNQUANTIZED:
                dst = _mix_rule(c, name, shape, dst, ft.name, model)
                fb = fallback(shape[0], dst)
                dst, fell_back = fb, fb != dst
        plans.append(TensorPlan(name, shape, src, dst, fell_back))
    return plans


def _layer_info(c_index: int, n_layer: int, name: str, model: ModelInfo) -> tuple[int, int]:
    """layer_info: the counter, or for MoE models (experts are not consecutive) the N of blk.N."""
    if model.n_expert > 1:
        layer = layer_of(name)
        if layer is None:
            raise UnsupportedError(f"failed to determine the layer of tensor {name!r}")
        if not 0 <= layer < n_layer:
            raise UnsupportedError(f"bad layer {layer} for tensor {name!r}; must be in [0, {n_layer})")
        return layer, n_layer
    return c_index, n_layer


def _mix_rule(c: _Counters, name: str, shape: tuple[int, ...], new: T, ft: str, model: ModelInfo) -> T:
    """llama_tensor_get_type_impl for Ember's file types (the IQ/TQ/MXFP4 branches cannot be reached)."""
    cat = category(name)
    falcon = model.arch == "falcon"
    if cat == Category.OUTPUT or (c.tied_embeddings and cat == Category.TOKEN_EMBD):
        if falcon or shape[0] % format_of(new).block_size:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == Category.TOKEN_EMBD:
        return new
    if cat in _ATTN_V_LIKE:
        i, n = c.i_attention_wv, c.n_attention_wv
        if ft == "Q2_K":
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif ft == "Q3_K_M":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ft == "Q3_K_L":
            new = T.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = T.Q6_K
        elif ft == "Q4_K_S" and i < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K  # 70B: 8 heads share attn_v, which is small - more bits cost little
        if model.n_expert == 8:
            new = T.Q8_0
        c.i_attention_wv += 1
        return new
    if cat == Category.ATTENTION_K:
        return T.Q8_0 if model.n_expert == 8 else new
    if cat == Category.FFN_DOWN:
        i, n = _layer_info(c.i_ffn_down, c.n_ffn_down, name, model)
        if ft == "Q2_K":
            new = T.Q3_K
        elif ft == "Q3_K_M":
            new = (T.Q5_K if i < n // 16
                   else T.Q4_K if not falcon or use_more_bits(i, n) else T.Q3_K)
        elif ft == "Q3_K_L":
            new = T.Q4_K if falcon else T.Q5_K
        elif ft == "Q4_K_M":
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if use_more_bits(i, n) else T.Q4_K
            elif use_more_bits(i, n):
                new = T.Q6_K
        elif ft == "Q5_K_M" and use_more_bits(i, n):
            new = T.Q6_K
        elif ft == "Q4_K_S" and not falcon and i < n // 8:
            new = T.Q5_K
        c.i_ffn_down += 1
        return new
    if cat == Category.ATTENTION_OUTPUT:
        if not falcon:
            if model.n_expert == 8:
                if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new = T.Q5_K
            else:
                new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(ft, new)
        elif ft == "Q3_K_L":
            new = T.Q4_K
        return new
    # llama.cpp has an attn_qkv rule here too (Q4_K for Q3_K_M/L, ...), but attn_qkv takes the attn_v branch
    # above first, so it never applies; nor do the Q4_0/Q5_0 ffn_down rules, which need an imatrix.
    if cat == Category.FFN_GATE:
        _layer_info(c.i_ffn_gate, c.n_ffn_gate, name, model)  # validates MoE layer names, as llama.cpp does
        c.i_ffn_gate += 1
    elif cat == Category.FFN_UP:
        _layer_info(c.i_ffn_up, c.n_ffn_up, name, model)
        c.i_ffn_up += 1
    return new

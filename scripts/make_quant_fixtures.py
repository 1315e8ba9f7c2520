"""Write tests/fixtures/quant/*.json: what llama.cpp's quantizer makes of a small deterministic model.

DEV TOOL ONLY: needs llama-cpp-python 0.3.36 (its vendored llama.cpp is the reference Ember matches), which is
never a dependency of Ember:

    python scripts/make_quant_fixtures.py            # writes the fixtures
    python scripts/make_quant_fixtures.py --bench    # also times llama.cpp vs Ember on a larger model

Fixtures written (tests/fixtures/quant/):

| file          | what                                                                                   |
|---------------|----------------------------------------------------------------------------------------|
| model.json    | per llama_ftype name: every output tensor's type, ggml shape and SHA-256 of its bytes,  |
|               | in llama.cpp's output order, for `llama_model_quantize(tiny.gguf, out, ftype)`; the     |
|               | output files' SHA-256; "chains": llama.cpp's outputs requantized (CHAINS)               |
| kernels.json  | per ggml type: SHA-256 of `ggml_quantize_chunk` applied to kernel_data() (edge cases)   |
| smollm2.json  | the real SmolLM2-135M-Instruct Q4_1 file requantized to SMOLLM2_TYPES: type per tensor  |
|               | (TYPE_CODES), one SHA-256 over all tensor data, and the output file's SHA-256           |
| types.json    | per TYPE_VARIANTS model and file type: llama.cpp's type for every tensor, one TYPE_CODES |
|               | character each, in its tensor order (a dry run: only names and shapes matter), covering  |
|               | GQA, 70B, MoE, falcon, tied and odd-width models                                         |

The input model is not committed (it is ~7 MB of float32); build_model() below regenerates it bit for bit
(numpy's PCG64 streams are platform independent), and model.json records the SHA-256 of every input tensor so
that a drift in the generator shows up as such rather than as a quantizer mismatch. The tests import
build_model / kernel_data from this file.

The model is a 2-layer llama (n_embd 256, 4 heads / 2 KV heads, n_ff 768, vocab 512) plus tensors that exercise
the type-choice corner cases:

| tensor                    | ggml shape    | why                                                          |
|---------------------------|---------------|--------------------------------------------------------------|
| blk.0.attn_k.weight       | [256, 128]    | rows 0-12 are edge cases (zeros, constants, tiny, outliers)   |
| blk.1.attn_output.weight  | [256, 256]    | stored F16 in the input: the dequantize-first path           |
| blk.0.ffn_gate_inp.weight | [256, 4]      | 2-D but never quantized (expert router)                      |
| blk.0.attn_extra.weight   | [96, 16]      | rows not a multiple of 256: K-quant fallback                 |
| blk.1.attn_odd.weight     | [40, 8]       | rows not a multiple of 32: F16 fallback                      |
| blk.1.extra_3d.weight     | [256, 4, 2]   | a 3-D tensor                                                 |
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "quant"

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_LAYER = 256, 4, 2, 64, 768, 2

# llama_ftype names (llama.h) covered by the fixtures: all the types `ember quantize` produces.
FILE_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
              "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
# (first file type, then requantized to) pairs recorded in model.json "chains".
CHAINS = (("F16", "Q4_K_M"), ("BF16", "Q5_K_M"), ("Q4_K_M", "Q8_0"), ("Q6_K", "Q4_0"), ("Q2_K", "Q6_K"),
          ("Q5_1", "Q3_K_M"))
# File types recorded for the real SmolLM2-135M-Instruct Q4_1 file (smollm2.json).
SMOLLM2_TYPES = ("Q4_K_M", "Q8_0")
KERNEL_TYPES = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _edge_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """13 rows of `n` (a multiple of 256) float32 values that hit the quantizers' special paths."""
    rows = np.zeros((13, n), dtype=np.float32)
    rows[1] = 0.5                                              # constant: max == min
    rows[2] = -0.25
    rows[3, 17] = 3.0                                          # one outlier among zeros
    rows[4] = 1e-20 * rng.standard_normal(n)                   # below GROUP_MAX_EPS (1e-15)
    rows[5] = np.abs(rng.standard_normal(n))                   # all positive: min clamps to 0
    rows[6] = -np.abs(rng.standard_normal(n))                  # all negative
    rows[7] = rng.integers(-8, 9, n) / 8.0                     # exact grid: rounding ties
    sub = rng.standard_normal((n // 16, 16)) * 10.0 ** rng.integers(-4, 3, (n // 16, 1))
    sub[::5] = 0.0                                             # zero sub-blocks next to big ones
    sub[1::7] = 0.125
    rows[8] = sub.reshape(-1)                                  # wide dynamic range inside a super-block
    rows[9] = 1e-5 * rng.standard_normal(n)                    # fp16-subnormal scales
    rows[10] = 3e3 * rng.standard_normal(n)                    # large
    rows[11] = rng.standard_normal(n) ** 3                     # heavy tails
    z = rows[12].reshape(-1, 32)                               # signed zeros: which one is "first" is stored
    z[0] = -0.0
    z[1, 0] = -0.0
    z[2, 5::3] = -0.0
    z[3, ::2] = -0.0
    z[3, 1::4] = 0.75
    z[4, 1::2] = -np.abs(rng.standard_normal(16))
    z[4, ::4] = -0.0
    z[5, 1::2] = -0.0                                          # +0.0 first: min and max are +0.0, not -0.0
    z[6:] = rng.standard_normal(z[6:].shape)
    return rows


def kernel_data() -> np.ndarray:
    """[35, 512] float32: the 13 edge rows, a row of subnormal-scale blocks and one of ~1e37 values (float
    overflow inside the fits), then 20 plain random rows; input of kernels.json."""
    rng = np.random.default_rng(1234)
    tiny = rng.standard_normal(512) * np.float32(10.0) ** rng.integers(-45, -36, (16, 1)).repeat(32, 1).reshape(-1)
    huge = rng.standard_normal(512) * 1e37
    extreme = np.stack([tiny, huge]).astype(np.float32)
    return np.concatenate([_edge_rows(rng, 512), extreme, rng.standard_normal((20, 512)).astype(np.float32)])


def _vocab() -> tuple[list[str], list[float], list[int]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import spm_vocab

    words = [f"\u2581w{i}" for i in range(512 - 259)]
    return spm_vocab(words)


def build_model(path: Path) -> dict[str, np.ndarray]:
    """Write the deterministic float32 llama GGUF; return its tensors (numpy order) by name."""
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(20240601)
    tokens, scores, types = _vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("quant-fixture")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_string("quant.fixture.note", "metadata that must be carried over")

    out: dict[str, np.ndarray] = {}

    def add(name: str, a: np.ndarray, f16: bool = False) -> None:
        a = a.astype(np.float32)
        out[name] = a
        w.add_tensor(name, a.astype(np.float16) if f16 else a, raw_dtype=T.F16 if f16 else None)

    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        return rng.normal(0, std, size=(rows, cols))

    n_vocab = len(tokens)
    add("token_embd.weight", mat(n_vocab, N_EMBD, 0.5))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + rng.normal(0, 0.1, N_EMBD))
        add(p + "attn_q.weight", mat(N_HEAD * HEAD_DIM, N_EMBD, 0.08))
        k = mat(N_HEAD_KV * HEAD_DIM, N_EMBD, 0.08)
        if i == 0:
            k[:13] = _edge_rows(rng, N_EMBD)
        add(p + "attn_k.weight", k)
        add(p + "attn_v.weight", mat(N_HEAD_KV * HEAD_DIM, N_EMBD, 0.08))
        add(p + "attn_output.weight", mat(N_EMBD, N_HEAD * HEAD_DIM, 0.08), f16=i == 1)
        add(p + "ffn_norm.weight", 1 + rng.normal(0, 0.1, N_EMBD))
        add(p + "ffn_gate.weight", mat(N_FF, N_EMBD, 0.08))
        add(p + "ffn_up.weight", mat(N_FF, N_EMBD, 0.08))
        add(p + "ffn_down.weight", mat(N_EMBD, N_FF, 0.06))
    add("blk.0.ffn_gate_inp.weight", mat(4, N_EMBD, 0.1))
    add("blk.0.attn_extra.weight", mat(16, 96, 0.1))
    add("blk.1.attn_odd.weight", mat(8, 40, 0.1))
    add("blk.1.extra_3d.weight", rng.normal(0, 0.1, size=(2, 4, N_EMBD)))
    add("output_norm.weight", 1 + rng.normal(0, 0.1, N_EMBD))
    add("output.weight", mat(n_vocab, N_EMBD, 0.1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def build_synthetic(path: Path, n_embd: int = 1024, n_ff: int = 2816, n_layer: int = 8, n_vocab: int = 8192) -> Path:
    """A ~107M-parameter float32 llama (rows multiples of 256, so K-quants are used throughout) for --bench."""
    import gguf

    rng = np.random.default_rng(7)
    n_head, n_head_kv = n_embd // 64, n_embd // 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("quant-bench")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_head_kv * 64, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_head_kv * 64, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Type-choice corner cases for types.json (only the tensor *types* are compared: llama.cpp's dry run, no data).
# Dimensions are the smallest that keep each case meaningful; data is zeros (F16) since a dry run reads none.
TYPE_VARIANTS: dict[str, dict] = {
    # tied embeddings (no output.weight), GQA 4: attn_v Q2_K -> Q4_K; 32 layers for use_more_bits / n/16
    "llama32-tied-gqa4": dict(arch="llama", n_layer=32, n_embd=256, n_ff=256, n_head=8, n_head_kv=2, n_expert=0,
                              tied=True),
    # 80 layers with GQA: llama.cpp's "70B" bump of attn_v
    "llama80-gqa8": dict(arch="llama", n_layer=80, n_embd=256, n_ff=256, n_head=8, n_head_kv=1, n_expert=0,
                         tied=False),
    # 8 experts: attn_v/attn_k Q8_0, attn_output Q5_K, ffn layer from the name, 3-D expert tensors
    "llama-moe8": dict(arch="llama", n_layer=8, n_embd=256, n_ff=256, n_head=8, n_head_kv=2, n_expert=8,
                       tied=False),
    # falcon: fused attn_qkv, its own ffn_down / attn_output rules, output always Q8_0
    "falcon12": dict(arch="falcon", n_layer=12, n_embd=256, n_ff=1024, n_head=4, n_head_kv=1, n_expert=0,
                     tied=False),
    # rows of 160 (a multiple of 32, not 256): output -> Q8_0 and fallbacks everywhere but ffn_down
    "llama8-embd160": dict(arch="llama", n_layer=8, n_embd=160, n_ff=512, n_head=5, n_head_kv=5, n_expert=0,
                           tied=False),
}


# One character per tensor type in types.json (a string per file type, in llama.cpp's tensor order).
TYPE_CODES = {"a": "F32", "h": "F16", "b": "BF16", "0": "Q4_0", "1": "Q4_1", "5": "Q5_0", "6": "Q5_1",
              "8": "Q8_0", "B": "Q2_K", "C": "Q3_K", "D": "Q4_K", "E": "Q5_K", "F": "Q6_K"}


def variant_tensors(v: dict) -> list[list]:
    """[[name, ggml shape, type name], ...] of a TYPE_VARIANTS model."""
    e, f, L = v["n_embd"], v["n_ff"], v["n_layer"]
    hd = e // v["n_head"]
    kv = hd * v["n_head_kv"]
    out: list[list] = [["token_embd.weight", [e, 512], "F16"], ["output_norm.weight", [e], "F32"]]
    if not v["tied"]:
        out.append(["output.weight", [e, 512], "F16"])
    for i in range(L):
        p = f"blk.{i}."
        out.append([p + "attn_norm.weight", [e], "F32"])
        if v["arch"] == "falcon":
            out.append([p + "attn_norm.bias", [e], "F32"])
            out.append([p + "attn_qkv.weight", [e, e + 2 * kv], "F16"])
        else:
            out += [[p + "attn_q.weight", [e, e], "F16"], [p + "attn_k.weight", [e, kv], "F16"],
                    [p + "attn_v.weight", [e, kv], "F16"], [p + "ffn_norm.weight", [e], "F32"]]
        out.append([p + "attn_output.weight", [e, e], "F16"])
        if v["n_expert"]:
            n = v["n_expert"]
            out += [[p + "ffn_gate_inp.weight", [e, n], "F32"], [p + "ffn_gate_exps.weight", [e, f, n], "F16"],
                    [p + "ffn_up_exps.weight", [e, f, n], "F16"], [p + "ffn_down_exps.weight", [f, e, n], "F16"]]
        else:
            if v["arch"] != "falcon":
                out.append([p + "ffn_gate.weight", [e, f], "F16"])
            out += [[p + "ffn_up.weight", [e, f], "F16"], [p + "ffn_down.weight", [f, e], "F16"]]
    return out


def build_variant(path: Path, v: dict) -> list[list]:
    """Write a TYPE_VARIANTS model (zeros) that llama.cpp's quantizer accepts; return its tensor list."""
    import gguf

    tokens, scores, types = _vocab()
    w = gguf.GGUFWriter(str(path), v["arch"])
    w.add_context_length(256)
    w.add_embedding_length(v["n_embd"])
    w.add_block_count(v["n_layer"])
    w.add_feed_forward_length(v["n_ff"])
    w.add_head_count(v["n_head"])
    w.add_head_count_kv(v["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    if v["n_expert"]:
        w.add_expert_count(v["n_expert"])
        w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    tensors = variant_tensors(v)
    for name, shape, t in tensors:
        dtype = np.float16 if t == "F16" else np.float32
        w.add_tensor(name, np.zeros(shape[::-1], dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def dump_json(path: Path, obj: object) -> None:
    """Indented JSON, except that lists of plain values short enough (shapes, tensor rows) stay on one line."""
    def fmt(o: object, pad: str) -> str:
        flat = json.dumps(o)
        if not isinstance(o, (dict, list)) or (isinstance(o, list) and len(flat) <= 100 and "{" not in flat):
            return flat
        inner = pad + " "
        if isinstance(o, dict):
            items = [f"{inner}{json.dumps(k)}: {fmt(v, inner)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        return "[\n" + ",\n".join(inner + fmt(v, inner) for v in o) + "\n" + pad + "]"

    path.write_text(fmt(obj, "") + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# -- llama.cpp side (dev only) -----------------------------------------------------------------------------

def _llama_cpp():
    import llama_cpp  # dev-only dependency

    assert llama_cpp.__version__ == "0.3.36", llama_cpp.__version__
    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    return llama_cpp


def llama_quantize(src: Path, dst: Path, ftype_name: str, nthread: int = 0, allow_requantize: bool = False) -> None:
    import gguf

    L = _llama_cpp()
    params = L.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType["ALL_F32" if ftype_name == "F32" else f"MOSTLY_{ftype_name}"])
    params.nthread = nthread
    params.allow_requantize = allow_requantize
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with {rc}")


def llama_dry_run(src: Path, ftype_name: str) -> list[tuple[str, str]]:
    """llama.cpp's type choice for every tensor, in its order, from a dry run's log (no data is read)."""
    import re

    import gguf

    L = _llama_cpp()
    text: list[str] = []
    cb = L.llama_log_callback(lambda level, msg, user: text.append(msg.decode("utf-8", "replace")))
    L.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        params = L.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype_name}" if ftype_name != "F32" else "ALL_F32"])
        params.dry_run = True
        rc = L.llama_model_quantize(str(src).encode(), b"/nonexistent/dry-run.gguf", ctypes.byref(params))
    finally:
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))
    if rc != 0:
        raise RuntimeError(f"dry run {ftype_name} failed:\n{''.join(text)[-2000:]}")
    out = []
    line_re = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size = [^\n]*?(?:\((\w+)\))?\n")
    for m in line_re.finditer("".join(text)):
        out.append((m.group(1), (m.group(3) or m.group(2)).upper()))
    return out


def ggml_quantize(x: np.ndarray, type_name: str) -> bytes:
    """ggml_quantize_chunk from llama-cpp-python's libggml-base: the reference kernels themselves."""
    import gguf

    L = _llama_cpp()
    lib = ctypes.CDLL(str(Path(L.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    qt = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros(rows * n // block * size, dtype=np.uint8)
    got = fn(int(qt), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert got == out.size, (got, out.size)
    return out.tobytes()


def describe(path: Path) -> list[list]:
    """[[name, type, ggml shape, sha256], ...] in file order."""
    from ember.gguf import open_gguf

    with open_gguf(path) as f:
        return [[t.name, t.type_name, list(t.shape), sha256(f.tensor_bytes(t.name))] for t in f.tensors.values()]


def make_fixtures() -> None:
    import llama_cpp

    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny-f32.gguf"
        tensors = build_model(src)
        model = {
            "generator": {"llama_cpp_python": llama_cpp.__version__, "script": "scripts/make_quant_fixtures.py"},
            "input_sha256": {name: sha256(a) for name, a in tensors.items()},
            "input_file_sha256": file_sha256(src),
            "file_sha256": {},
            "ftypes": {},
        }
        for ft in FILE_TYPES:
            dst = Path(tmp) / f"tiny-{ft}.gguf"
            llama_quantize(src, dst, ft)
            model["ftypes"][ft] = describe(dst)
            model["file_sha256"][ft] = file_sha256(dst)
            print(ft, {t: sum(1 for r in model["ftypes"][ft] if r[1] == t)
                       for t in sorted({r[1] for r in model["ftypes"][ft]})})
        # Requantizing llama.cpp's own outputs (allow_requantize): exercises dequantize-then-quantize.
        model["chains"] = {}
        for first, second in CHAINS:
            dst = Path(tmp) / f"tiny-{first}-{second}.gguf"
            llama_quantize(Path(tmp) / f"tiny-{first}.gguf", dst, second, allow_requantize=True)
            model["chains"][f"{first}>{second}"] = describe(dst)
    dump_json(FIXTURES / "model.json", model)

    x = kernel_data()
    kernels = {"generator": model["generator"], "input_sha256": sha256(x),
               "sha256": {t: hashlib.sha256(ggml_quantize(x, t)).hexdigest() for t in KERNEL_TYPES}}
    dump_json(FIXTURES / "kernels.json", kernels)

    types = {"generator": model["generator"], "type_codes": TYPE_CODES, "variants": {}}
    code = {t: c for c, t in TYPE_CODES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, v in TYPE_VARIANTS.items():
            src = Path(tmp) / f"{name}.gguf"
            build_variant(src, v)
            order = [n for n, _ in llama_dry_run(src, "Q8_0")]
            entry = {"order_sha256": hashlib.sha256("\n".join(order).encode()).hexdigest(), "ftypes": {}}
            for ft in FILE_TYPES:
                plan = llama_dry_run(src, ft)
                assert [n for n, _ in plan] == order
                entry["ftypes"][ft] = "".join(code[t] for _, t in plan)
            types["variants"][name] = entry
            print(name, len(tensors), "tensors")
    dump_json(FIXTURES / "types.json", types)


def data_sha256(path: Path) -> str:
    """One SHA-256 over every tensor's bytes, in file order (a compact fingerprint of a large model)."""
    from ember.gguf import open_gguf

    h = hashlib.sha256()
    with open_gguf(path) as f:
        for t in f.tensors.values():
            h.update(t.name.encode() + b"\0" + t.type_name.encode() + b"\0")
            h.update(f.tensor_bytes(t.name))
    return h.hexdigest()


def make_smollm2_fixture(src: Path) -> None:
    """smollm2.json: llama.cpp requantizing the real SmolLM2-135M-Instruct Q4_1 file (tied embeddings, rows of
    576 = fallbacks, real tokenizer metadata)."""
    import llama_cpp

    code = {t: c for c, t in TYPE_CODES.items()}
    out = {"generator": {"llama_cpp_python": llama_cpp.__version__, "script": "scripts/make_quant_fixtures.py"},
           "input_file_sha256": file_sha256(src), "ftypes": {}}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for ft in SMOLLM2_TYPES:
            dst = Path(tmp) / f"{ft}.gguf"
            llama_quantize(src, dst, ft, allow_requantize=True)
            out["ftypes"][ft] = {"types": "".join(code[r[1]] for r in describe(dst)),
                                 "data_sha256": data_sha256(dst), "file_sha256": file_sha256(dst)}
    dump_json(FIXTURES / "smollm2.json", out)


def bench(model: Path, ftype: str, nthread: int) -> None:
    """Time llama.cpp and Ember quantizing the same float32 (or f16/quantized) model; print the ratio."""
    from ember.quant.quantize import quantize_file

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t0 = time.perf_counter()
        llama_quantize(model, Path(tmp) / "ref.gguf", ftype, nthread=nthread, allow_requantize=True)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_file(model, Path(tmp) / "ember.gguf", ftype, allow_requantize=True, threads=nthread or None)
        t_ember = time.perf_counter() - t0
        same = describe(Path(tmp) / "ref.gguf") == describe(Path(tmp) / "ember.gguf")
    print(f"{model.name} -> {ftype}: llama.cpp {t_ref:.2f} s, Ember {t_ember:.2f} s, "
          f"speed ratio {t_ref / t_ember:.2f}, byte-identical: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", type=Path, metavar="GGUF",
                    help="time llama.cpp vs Ember on this model instead ('synthetic': a 107M-parameter F32 llama)")
    ap.add_argument("--type", default="Q4_K_M", help="file type for --bench (default Q4_K_M)")
    ap.add_argument("--threads", type=int, default=0, help="threads for both in --bench (0: all cores)")
    ap.add_argument("--smollm2", type=Path, default=Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="the SmolLM2-135M-Instruct Q4_1 file for smollm2.json (skipped if missing)")
    args = ap.parse_args()
    if args.bench:
        model = args.bench
        if str(model) == "synthetic":
            model = Path(tempfile.gettempdir()) / "ember-quant-bench-f32.gguf"
            if not model.exists():
                build_synthetic(model)
        bench(model, args.type, args.threads)
    else:
        make_fixtures()
        if args.smollm2.exists():
            make_smollm2_fixture(args.smollm2)
        else:
            print(f"{args.smollm2} not found: smollm2.json not written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

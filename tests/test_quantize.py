"""`ember quantize` against llama.cpp's quantizer (fixtures from scripts/make_quant_fixtures.py).

* model.json: the tiny llama built by build_model(), quantized by llama.cpp to every file type: each output
  tensor's type, shape and SHA-256 in llama.cpp's order, plus the whole output file's SHA-256;
* kernels.json: ggml_quantize_chunk on edge-case data (zeros, signed zeros, constants, ties, tiny/huge values);
* smollm2.json: the real SmolLM2-135M-Instruct Q4_1 file requantized (only where that model is available);
* types.json: llama.cpp's type for every tensor of models that exercise the mix rules (GQA, 70B, MoE, falcon,
  tied embeddings, rows that are not a multiple of 256).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ember.errors import EmberError, InvalidParameterError, UnsupportedError
from ember.gguf import open_gguf
from ember.quant import dequantize
from ember.quant import kquants
from ember.quant.mix import (FILE_TYPES, ModelInfo, allows_quantization, choose_types, fallback, file_type,
                             llama_order, n_dims, use_more_bits)
from ember.quant.quantize import QUANTIZERS, quantize_array, quantize_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "quant"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_quant_fixtures", ROOT / "scripts" / "make_quant_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_quant_fixtures", mod)
    spec.loader.exec_module(mod)
    return mod


mqf = _load_script()
MODEL = json.loads((FIXTURES / "model.json").read_text())
KERNELS = json.loads((FIXTURES / "kernels.json").read_text())
TYPES = json.loads((FIXTURES / "types.json").read_text())


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("quant") / "tiny-f32.gguf"
    tensors = mqf.build_model(path)
    drift = [n for n, a in tensors.items() if _sha(a) != MODEL["input_sha256"][n]]
    assert not drift, f"build_model() no longer reproduces the fixture's input tensors: {drift}"
    return path, tensors


@pytest.fixture(scope="module")
def q4km(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "tiny-q4_k_m.gguf"
    quantize_file(tiny[0], out, "Q4_K_M")
    return out


# -- byte identity with llama.cpp -------------------------------------------------------------------------------

@pytest.mark.parametrize("ftype", list(MODEL["ftypes"]))
def test_tensors_match_llama_cpp(tiny, tmp_path, ftype):
    out = tmp_path / f"{ftype}.gguf"
    quantize_file(tiny[0], out, ftype, threads=2)
    assert mqf.describe(out) == MODEL["ftypes"][ftype]  # [name, type, shape, sha256] in llama.cpp's order
    if mqf.file_sha256(tiny[0]) == MODEL["input_file_sha256"]:  # same gguf-py writer: whole file identical too
        assert mqf.file_sha256(out) == MODEL["file_sha256"][ftype]


@pytest.mark.parametrize("chain", list(MODEL["chains"]))
def test_requantized_match_llama_cpp(tiny, tmp_path, chain):
    """llama.cpp's output of the first type (identical to Ember's, see above) requantized to the second."""
    first, second = chain.split(">")
    mid, out = tmp_path / "mid.gguf", tmp_path / "out.gguf"
    quantize_file(tiny[0], mid, first)
    quantize_file(mid, out, second, allow_requantize=True)
    assert mqf.describe(out) == MODEL["chains"][chain]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_real_model_requantized_like_llama_cpp(smollm2_path, tmp_path, ftype):
    """The real SmolLM2-135M-Instruct Q4_1 file (tied embeddings, 576-wide rows, a 49k-token vocabulary)."""
    ref = json.loads((FIXTURES / "smollm2.json").read_text())
    if mqf.file_sha256(smollm2_path) != ref["input_file_sha256"]:
        pytest.skip("a different SmolLM2 file than the fixture was made from")
    out = tmp_path / "out.gguf"
    quantize_file(smollm2_path, out, ftype, allow_requantize=True)
    codes = {t: c for c, t in TYPES["type_codes"].items()}
    assert "".join(codes[r[1]] for r in mqf.describe(out)) == ref["ftypes"][ftype]["types"]
    assert mqf.data_sha256(out) == ref["ftypes"][ftype]["data_sha256"]
    assert mqf.file_sha256(out) == ref["ftypes"][ftype]["file_sha256"]


@pytest.mark.parametrize("name", list(KERNELS["sha256"]))
def test_kernels_match_ggml(name):
    x = mqf.kernel_data()
    assert _sha(x) == KERNELS["input_sha256"]
    assert hashlib.sha256(quantize_array(x, T[name]).tobytes()).hexdigest() == KERNELS["sha256"][name]


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_exact_rounding_path_gives_the_same_bytes(monkeypatch, name):
    """make_qkx2_quants' bit-level nearest_int fallback (normally only for pathological blocks) is exact too."""
    x = mqf.kernel_data()
    monkeypatch.setattr(kquants, "FORCE_EXACT_ROUNDING", True)
    assert hashlib.sha256(quantize_array(x, T[name]).tobytes()).hexdigest() == KERNELS["sha256"][name]


def test_threads_and_chunks_do_not_change_bytes():
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    for t in (T.Q4_K, T.Q3_K, T.Q5_0):
        assert np.array_equal(quantize_array(x, t, threads=1), quantize_array(x, t, threads=2))
        one = np.concatenate([quantize_array(x[i:i + 1], t) for i in range(x.shape[0])])
        assert np.array_equal(quantize_array(x, t), one)


@pytest.mark.parametrize("variant", list(TYPES["variants"]))
def test_type_mix_matches_llama_cpp(variant):
    v = mqf.TYPE_VARIANTS[variant]
    tensors = [(n, s, T[t]) for n, s, t in mqf.variant_tensors(v)]
    model = ModelInfo(v["arch"], v["n_layer"], v["n_head"], v["n_head_kv"], v["n_expert"])
    ref = TYPES["variants"][variant]
    codes = {t: c for c, t in TYPES["type_codes"].items()}
    for ft, expected in ref["ftypes"].items():
        plans = choose_types(tensors, FILE_TYPES[ft], model)
        order = "\n".join(p.name for p in plans)
        assert hashlib.sha256(order.encode()).hexdigest() == ref["order_sha256"]
        got = "".join(codes[p.dst_type.name] for p in plans)
        diff = [(p.name, p.dst_type.name, TYPES["type_codes"][e]) for p, e in zip(plans, expected)
                if codes[p.dst_type.name] != e]
        assert got == expected, f"{variant} {ft}: (tensor, ember, llama.cpp) {diff[:8]}"


# -- the written file -------------------------------------------------------------------------------------------

def test_metadata_carried_over(tiny, q4km):
    with open_gguf(tiny[0]) as src, open_gguf(q4km) as out:
        for key, value in src.metadata.items():
            if key == "general.file_type":
                continue
            assert out.metadata_types[key] == src.metadata_types[key], key
            if isinstance(value, np.ndarray):
                assert np.array_equal(out.metadata[key], value), key
            else:
                assert out.metadata[key] == value, key
        assert out.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert out.metadata["general.quantization_version"] == 2
        assert out.metadata["quant.fixture.note"] == "metadata that must be carried over"


# Relative RMS error of dequantize(quantize(x)) vs x that each type comfortably stays under.
_TOLERANCE = {T.F32: 0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 0.01, T.Q6_K: 0.02, T.Q5_K: 0.04, T.Q5_0: 0.05,
              T.Q5_1: 0.05, T.Q4_K: 0.08, T.Q4_0: 0.1, T.Q4_1: 0.1, T.Q3_K: 0.2, T.Q2_K: 0.4}


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "Q8_0", "BF16"])
def test_output_loads_and_dequantizes_close(tiny, tmp_path, ftype):
    out = tmp_path / "out.gguf"
    quantize_file(tiny[0], out, ftype)
    with open_gguf(out) as f:
        assert set(f.tensors) == set(tiny[1])
        for name, info in f.tensors.items():
            x = tiny[1][name].astype(np.float32)
            if name == "blk.1.attn_output.weight":  # stored F16 in the input
                x = x.astype(np.float16).astype(np.float32)
            y = dequantize(f.tensor_bytes(name), info.ggml_type, info.shape).numpy()
            assert y.shape == x.shape, name
            rel = np.linalg.norm(y - x) / np.linalg.norm(x)
            assert rel <= _TOLERANCE[info.ggml_type], (name, info.type_name, rel)


def test_requantize_refused_without_flag(q4km, tmp_path):
    out = tmp_path / "re.gguf"
    with pytest.raises(InvalidParameterError, match="allow-requantize"):
        quantize_file(q4km, out, "Q8_0")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing left behind
    quantize_file(q4km, out, "Q8_0", allow_requantize=True)
    with open_gguf(out) as f:
        assert f.metadata["general.file_type"] == 7
        assert {t.type_name for t in f.tensors.values()} <= {"Q8_0", "F32", "F16"}


def test_same_type_is_copied_without_the_flag(q4km, tmp_path):
    """llama.cpp only refuses tensors whose type would change; Q4_K_M -> Q4_K_M changes none."""
    out = tmp_path / "same.gguf"
    quantize_file(q4km, out, "Q4_K_M")
    assert mqf.describe(out) == mqf.describe(q4km)


def test_f16_input_is_not_requantizing(tiny, tmp_path):
    f16 = tmp_path / "f16.gguf"
    quantize_file(tiny[0], f16, "F16")
    quantize_file(f16, tmp_path / "q4_0.gguf", "Q4_0")  # F16 is not "quantized": no flag needed


@pytest.mark.parametrize("via", ["F16", "BF16"])
def test_half_inputs_quantize_like_their_float32_values(tiny, tmp_path, via):
    """F16/BF16 sources are widened with numpy (not ember.quant.dequant): the Q8_0 result must equal
    quantizing the exactly widened values, tensor by tensor, and llama.cpp's type choice stays the same."""
    half = tmp_path / f"{via}.gguf"
    quantize_file(tiny[0], half, via)
    out = tmp_path / "q8_0.gguf"
    quantize_file(half, out, "Q8_0", threads=2)
    assert [r[:3] for r in mqf.describe(out)] == [r[:3] for r in MODEL["ftypes"]["Q8_0"]]
    with open_gguf(half) as h, open_gguf(out) as q:
        for name, t in q.tensors.items():
            if t.ggml_type != T.Q8_0:
                continue
            values = dequantize(h.tensor_bytes(name), h.tensors[name].ggml_type, h.tensors[name].shape).numpy()
            assert np.array_equal(q.tensor_bytes(name), quantize_array(values, T.Q8_0)), name


def test_bf16_and_f16_kernels_on_nan_and_extremes():
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN -> top half | 0x40; F16: IEEE rounding with
    overflow to inf (the bit formulas written out here, independent of the kernels)."""
    x = np.array([[1.0, -0.0, 3.4e38, -3.4e38, 1e-45, 65519.0, 65520.0, 1.00390625, 1.01171875, np.inf,
                   -np.inf, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 0.1, -7.5]], np.float32)
    nan = x.copy()
    nan.view(np.uint32)[0, :3] = [0x7FC00000, 0xFF800001, 0x7F812345]
    for v in (x, nan):
        u = v.view(np.uint32).astype(np.uint64)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        want = np.where(is_nan, (u >> 16) | 64, (u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        assert np.array_equal(quantize_array(v, T.BF16).view(np.uint16), want.reshape(-1))
    with np.errstate(over="ignore"):
        assert np.array_equal(quantize_array(x, T.F16).view(np.float16), x.astype(np.float16).reshape(-1))


def test_quantize_command_does_not_import_torch():
    """`ember --help` and `ember quantize` from float files start without torch (about a second)."""
    import subprocess

    code = ("import sys, ember.cli.main, ember.quant, ember.quant.quantize, ember.quant.mix; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_bad_type_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(InvalidParameterError, match="unknown quantization type 'Q9_K'.*Q4_K_M"):
        quantize_file(tiny[0], tmp_path / "x.gguf", "Q9_K")
    with pytest.raises(UnsupportedError, match="IQ2_XXS is not implemented"):
        file_type("iq2_xxs")
    assert file_type("q4_k_m") is FILE_TYPES["Q4_K_M"]
    assert file_type("LLAMA_FTYPE_MOSTLY_Q8_0").ftype == 7
    assert not (tmp_path / "x.gguf").exists()


def test_non_finite_input_refused(tmp_path):
    import gguf

    path = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(1)
    x = np.ones((4, 256), np.float32)
    x[2, 7] = np.nan
    w.add_tensor("blk.0.attn_q.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EmberError, match="NaN or infinite"):
        quantize_file(path, tmp_path / "out.gguf", "Q4_0")


def test_progress_callback(tiny, tmp_path):
    events = []
    quantize_file(tiny[0], tmp_path / "p.gguf", "Q4_0", progress=events.append)
    assert [e.index for e in events] == list(range(1, len(MODEL["ftypes"]["Q4_0"]) + 1))
    assert [e.name for e in events] == [r[0] for r in MODEL["ftypes"]["Q4_0"]]
    assert all(e.count == len(events) for e in events)
    assert events[0].dst_type == "Q6_K" and events[0].src_type == "F32"  # output.weight comes first


# -- CLI --------------------------------------------------------------------------------------------------------

def test_cli(tiny, tmp_path, capsys):
    from ember.cli.quantize import main

    out = tmp_path / "cli.gguf"
    assert main([str(tiny[0]), str(out), "q6_k", "-t", "2"]) == 0
    err = capsys.readouterr()
    assert err.out == ""
    assert "output.weight" in err.err and "F32 -> Q6_K" in err.err and "fell back" in err.err
    assert mqf.describe(out) == MODEL["ftypes"]["Q6_K"]

    assert main([str(tiny[0]), str(tmp_path / "bad.gguf"), "Q7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: unknown quantization type 'Q7'") and "\n" == err[-1] and err.count("\n") == 1

    assert main([str(out), str(tmp_path / "re.gguf"), "Q4_0"]) == 1
    assert "--allow-requantize" in capsys.readouterr().err


def test_cli_registers_on_subparsers():
    import argparse

    from ember.cli.quantize import add_parser, run

    parser = argparse.ArgumentParser(prog="ember")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize", "a.gguf", "b.gguf", "Q4_K_M", "--allow-requantize", "-q"])
    assert args.handler is run and args.allow_requantize and args.quiet and args.type == "Q4_K_M"


# -- mix helpers ------------------------------------------------------------------------------------------------

def test_use_more_bits_pattern():
    # 32 layers: first 4, last 4, and every third in between starting at layer 6.
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                              30, 31]


def test_fallback_table():
    assert fallback(96, T.Q2_K) == T.Q4_0
    assert fallback(96, T.Q3_K) == T.Q4_0
    assert fallback(96, T.Q4_K) == T.Q5_0
    assert fallback(96, T.Q5_K) == T.Q5_1
    assert fallback(96, T.Q6_K) == T.Q8_0
    assert fallback(40, T.Q4_K) == T.F16
    assert fallback(40, T.Q8_0) == T.F16
    assert fallback(512, T.Q4_K) == T.Q4_K


def test_llama_order_and_quantizable():
    names = ["blk.10.ffn_up.weight", "output.weight", "blk.2.attn_q.weight", "token_embd.weight",
             "blk.2.attn_k.weight"]
    assert llama_order(names) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight",
                                  "blk.2.attn_q.weight", "blk.10.ffn_up.weight"]
    assert n_dims((256, 1, 1)) == 1 and n_dims((256, 4, 1)) == 2 and n_dims((256, 1, 3)) == 3
    assert allows_quantization("blk.0.attn_q.weight", (256, 256), "llama")
    assert not allows_quantization("blk.0.attn_norm.weight", (256, 256), "llama")
    assert not allows_quantization("blk.0.attn_q.bias", (256, 256), "llama")
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (256, 8), "llama")
    assert not allows_quantization("blk.0.attn_q.weight", (256, 1), "llama")
    assert allows_quantization("abcde", (256, 2), "llama")  # llama.cpp's size_t quirk: any 5-byte name


def test_model_info_from_metadata(tiny):
    with open_gguf(tiny[0]) as f:
        m = ModelInfo.from_metadata(f.metadata)
    assert (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_expert, m.n_gqa) == ("llama", 2, 4, 2, 0, 2)
    assert ModelInfo("llama", 80, 64, 8).is_70b and not ModelInfo("llama", 80, 64, 64).is_70b
    assert ModelInfo("qwen2", 80, 64, 64).is_70b and not ModelInfo("qwen2", 64, 40, 8).is_70b


def test_quantizer_table_covers_the_file_types():
    for ft in FILE_TYPES.values():
        assert ft.default in QUANTIZERS

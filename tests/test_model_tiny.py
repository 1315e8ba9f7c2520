"""Tiny random GGUF models through Ember's whole loading path, checked against an independent reference.

Every weight type Ember accepts goes through the same model; a wrong dequantization, repacking, rope style,
norm or attention mask shows as logits far from the float64 numpy reference in tests/tiny_models.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import ember
from tiny_models import reference_logits, write_tiny_model

ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _check_close(ref: np.ndarray, got: np.ndarray) -> None:
    # Ember multiplies in bfloat16 (8-bit mantissa); errors of a few percent of the logit range are expected,
    # while a real defect (wrong rope, mask, layout) moves logits by the order of the range itself.
    scale = np.abs(ref).max()
    err = np.abs(ref - got).max()
    assert err < 0.04 * scale, f"max |diff| {err:.4f} vs logit scale {scale:.3f}"
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr > 0.999, corr


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_llama_every_weight_type(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_model(path, arch="llama", qtype=qtype, n_layer=2, seed=int(qtype))
    m = ember.load(path, n_ctx=64)
    ids = [int(i) for i in np.random.default_rng(1).integers(3, ref["n_vocab"], 24)]
    _check_close(reference_logits(ref, ids), m.logits(ids, all_positions=True))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_gemma3_matches_reference(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    # 6 layers: five sliding-window layers (window 4) and one global layer; 24 tokens cross the window.
    ref = write_tiny_model(path, arch="gemma3", qtype=qtype, n_layer=6, window=4, seed=7)
    m = ember.load(path, n_ctx=64)
    ids = [int(i) for i in np.random.default_rng(2).integers(3, ref["n_vocab"], 24)]
    _check_close(reference_logits(ref, ids), m.logits(ids, all_positions=True))


def test_llama_with_qkv_biases(tmp_path):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_model(path, arch="llama", qtype=T.Q8_0, biases=True)
    m = ember.load(path, n_ctx=64)
    ids = list(range(5, 25))
    _check_close(reference_logits(ref, ids), m.logits(ids, all_positions=True))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_incremental_decode_equals_one_pass(tmp_path, arch):
    """KV-cache path (prefill then one token at a time, through gemma3's sliding-window ring buffers) gives the
    same logits as one pass over the whole sequence."""
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path, arch=arch, qtype=T.Q4_0, n_layer=6 if arch == "gemma3" else 2, window=4)
    m = ember.load(path, n_ctx=64)
    ids = [int(i) for i in np.random.default_rng(3).integers(3, m.config.n_vocab, 20)]
    full = m.logits(ids, all_positions=True)
    cache = m.model.new_cache(64)
    steps = [m.model.forward(torch.tensor(ids[:7]), torch.arange(7), cache, all_logits=True)]
    for p in range(7, 20):
        steps.append(m.model.forward(torch.tensor([ids[p]]), torch.tensor([p]), cache))
    inc = torch.cat(steps).numpy()
    # Same math in a different batch shape: equal up to the bfloat16 rounding of the projections' outputs.
    np.testing.assert_allclose(inc, full, atol=2**-7 * np.abs(full).max())


def test_greedy_generation_follows_own_logits(tmp_path):
    """generate() with temperature 0 picks the argmax of the model's logits at every step."""
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path, arch="gemma3", qtype=T.Q8_0, n_layer=6, window=4)
    m = ember.load(path, n_ctx=64)
    prompt = [1, 260, 261, 262]
    out = m.generate(prompt, max_tokens=12, temperature=0)
    seq = list(prompt)
    for tok in out.ids:
        assert tok == int(np.argmax(m.logits(seq))), "greedy step differs from argmax"
        seq.append(tok)
    assert out.finish_reason in ("length", "stop")
    assert out.stats.generated_tokens == len(out.ids)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("x", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ember.api.EmberError, match="mamba"):
        ember.load(path)

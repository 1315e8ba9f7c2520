"""Ember's native kernels (ember/kernels/csrc): the qdot quantized matmul and decode attention through block
tables. Each is checked against an independent reference - the exact dequantization of ember.quant, a numpy
re-statement of the kernel's integer arithmetic, torch's SDPA - and for the property the engine relies on: a
row's result does not depend on the other rows of its call (bit for bit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

import ember
from ember.kernels import native, qdot
from ember.kernels.linear import make_linear
from ember.quant import dequantize
from ember.quant.quantize import quantize_array
from tiny_models import reference_logits, write_tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need AVX-512 VNNI and a compiler")

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q2_K, T.Q3_K, T.Q6_K]
K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
_name = lambda t: t.name  # noqa: E731  (test ids)


def _weight(qtype: T, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """A random GGUF weight of ggml shape (k, n) and its exact float32 dequantization [n, k]."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.2, 2.0, (n, 1))).astype(np.float32)
    raw = quantize_array(w, qtype)
    return raw, dequantize(raw, qtype, (k, n))


def _reference_qdot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, restated in numpy: x quantized per 32-group to int8 in float32 arithmetic as
    the kernel does it (d = amax / 127, q = round-half-even(x * (1 / d))), then exact float64 products of those
    codes with the exact weights."""
    xs = x.float().numpy().reshape(x.shape[0], -1, 32)
    d = np.abs(xs).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(xs * inv).astype(np.float64)
    return torch.from_numpy((q * d.astype(np.float64)).reshape(x.shape) @ w.double().numpy().T)


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
@pytest.mark.parametrize("n,k", [(64, 576), (48, 96), (16, 32), (32, 256)])
def test_packing_is_exact(qtype, n, k):
    if qtype in K_QUANTS and k % 256:
        pytest.skip("K-quants need rows of 256")
    raw, want = _weight(qtype, n, k)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, n))])
    # the kernel's dequantization goes through bfloat16; compare in float32 through the same rounding
    assert torch.equal(lin.dequantize(), want.bfloat16().float())
    p = qdot.parts_from_gguf(raw, qtype, (k, n))
    g = p.group
    exact = (p.u.float().view(n, k // g, g) * p.s[..., None] + p.z[..., None]).view(n, k)
    assert torch.allclose(exact, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("qtype", TYPES, ids=_name)
def test_matmul_is_the_int8_activation_product(qtype):
    n, k = 96, 512
    raw, w = _weight(qtype, n, k, seed=1)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, n))])
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.1, 3, 9)[:, None]
    y = lin(x)
    ref = _reference_qdot(x, w)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and that product is within activation-quantization error of the float product
    exact = x.double() @ w.double().T
    assert float((y.double() - exact).abs().max()) < 0.02 * float(exact.abs().max())


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q8_0, T.Q5_K, T.Q6_K], ids=_name)
def test_rows_do_not_depend_on_their_batch(qtype):
    n, k = 80, 768 if qtype in K_QUANTS else 320
    raw, _ = _weight(qtype, n, k, seed=2)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, n))])
    x = torch.randn(23, k, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([lin(x[i : i + 1]) for i in range(23)])
    for m in (2, 3, 4, 5, 7, 16, 23):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    assert torch.equal(lin(x.flip(0)).flip(0), alone)


@pytest.mark.parametrize("other,bits", [(T.Q8_0, 8), (T.Q6_K, 6), (T.Q5_0, 5), (T.Q5_K, 5), (T.Q3_K, 4)],
                         ids=lambda v: _name(v) if isinstance(v, T) else str(v))
def test_fused_parts_keep_the_wider_form(other, bits):
    k = 256
    raw4, w4 = _weight(T.Q4_0, 32, k, seed=3)
    raw8, w8 = _weight(other, 48, k, seed=4)
    fused = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw4, T.Q4_0, (k, 32)),
                                        qdot.parts_from_gguf(raw8, other, (k, 48))])
    assert fused.bits == bits and fused.out_features == 80
    assert fused.codes.shape[2] == {4: 256, 5: 320, 6: 384, 8: 512}[bits]  # nibbles + planes of high bits
    assert fused.scales.shape[1] == (2 if other in (T.Q6_K, T.Q3_K) else 1) * k // 32  # 16-wide: two per 32
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9))
    ref = _reference_qdot(x, torch.cat([w4, w8]))
    assert torch.allclose(fused(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(fused.dequantize(), torch.cat([w4, w8]).bfloat16().float())


@pytest.mark.parametrize("qtype,offset", [(T.Q4_0, 8), (T.Q5_0, 16), (T.Q8_0, 128), (T.Q3_K, 4), (T.Q6_K, 32),
                                          (T.Q4_1, None), (T.Q5_1, None), (T.Q4_K, None), (T.Q2_K, None)],
                         ids=lambda v: _name(v) if isinstance(v, T) else str(v))
def test_symmetric_weights_keep_no_mins(qtype, offset):
    """Types without a per-group bias store z = -offset * s, which the kernel derives: no mins to read."""
    k = 256
    raw, w = _weight(qtype, 32, k, seed=11)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, 32))])
    assert lin.offset == offset
    assert (lin.mins.numel() == 0) == (offset is not None)
    assert torch.equal(lin.dequantize(), w.bfloat16().float())
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(12))
    ref = _reference_qdot(x, w)
    assert torch.allclose(lin(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # fused with a part of another offset (or with mins), the weight keeps mins; with the same type, not
    other = T.Q4_1 if offset is not None else T.Q8_0
    raw2, w2 = _weight(other, 16, k, seed=13)
    mixed = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, 32)),
                                        qdot.parts_from_gguf(raw2, other, (k, 16))])
    assert mixed.offset is None and mixed.mins.numel() > 0
    assert torch.equal(mixed.dequantize(), torch.cat([w, w2]).bfloat16().float())
    same = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, 32))] * 2)
    assert same.offset == offset
    want = lin(x)
    assert torch.equal(same(x), torch.cat([want, want], dim=1))


@pytest.mark.parametrize("qtype,bits_per_weight", [(T.Q4_K, 4.75), (T.Q5_K, 5.75), (T.Q2_K, 5.25),
                                                   (T.Q3_K, 4.625), (T.Q6_K, 6.625)],
                         ids=lambda v: _name(v) if isinstance(v, T) else str(v))
def test_k_quants_keep_their_two_levels_of_scales(qtype, bits_per_weight):
    """d per 256 weights times an int8 per group: the same products the float32 parameters held."""
    n, k = 48, 512
    raw, w = _weight(qtype, n, k, seed=14)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, n))])
    assert lin.scale_codes.dtype == torch.int8 and lin.scales.shape == (n // 16, k // 256, 16)
    assert lin.nbytes * 8 / (n * k) == bits_per_weight
    assert torch.equal(lin.dequantize(), w.bfloat16().float())
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(15))
    ref = _reference_qdot(x, w)
    assert torch.allclose(lin(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    alone = torch.cat([lin(x[i : i + 1]) for i in range(7)])
    assert torch.equal(lin(x), alone)
    # fused with a part that has no super-blocks (Q8_0), the weight keeps per-group float parameters
    raw8, w8 = _weight(T.Q8_0, 16, k, seed=16)
    mixed = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, qtype, (k, n)),
                                        qdot.parts_from_gguf(raw8, T.Q8_0, (k, 16))])
    assert mixed.scale_codes.numel() == 0
    assert torch.equal(mixed.dequantize(), torch.cat([w, w8]).bfloat16().float())


def test_parameters_stay_float32_when_float16_would_round():
    raw, w = _weight(T.Q4_K, 16, 256, seed=5)  # Q4_K's d * scale is generally not a float16
    lin = make_linear(raw, T.Q4_K, (256, 16))
    assert isinstance(lin, qdot.QDotLinear) and lin.scales.dtype == torch.float32
    raw, _ = _weight(T.Q4_0, 16, 64, seed=5)
    assert make_linear(raw, T.Q4_0, (64, 16)).scales.dtype == torch.float16


def test_many_rows_take_the_bfloat16_gemm_only_without_exact_prefill(monkeypatch):
    monkeypatch.setenv("EMBER_BULK_BF16", "1")  # the path is correct on any CPU, only not faster without bf16
    raw, w = _weight(T.Q4_1, 64, 128, seed=6)
    lin = qdot.QDotLinear.from_parts([qdot.parts_from_gguf(raw, T.Q4_1, (128, 64))])
    x = torch.randn(100, 128, generator=torch.Generator().manual_seed(10))
    kernel = lin(x)
    monkeypatch.setattr(native, "EXACT", False)
    bulk = lin(x)
    want = F.linear(x.bfloat16(), w.bfloat16()).float()
    assert torch.allclose(bulk, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    assert not torch.equal(bulk, kernel)  # a different computation
    calls = []
    monkeypatch.setattr(lin, "_kernel", lambda t: calls.append(t.shape[0]) or torch.zeros(t.shape[0], 64))
    lin(x[:10])
    lin(x)
    assert calls == [10]  # 100 rows went to the GEMM
    monkeypatch.setattr(native, "EXACT", True)
    lin(x)
    assert calls == [10, 100]  # exact prefill: every row on the kernel


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_1), ("llama", T.Q8_0), ("gemma3", T.Q5_0)])
def test_tiny_model_matches_reference(tmp_path, arch, qtype):
    """Prompt (many-row path) and single-token steps (the kernel) against tests/tiny_models.py's float64 model."""
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_model(path, arch=arch, qtype=qtype, n_layer=2, window=4, seed=11)
    m = ember.load(path, n_ctx=128)
    assert isinstance(m.model.blocks[0].attn.wqkv, qdot.QDotLinear)
    ids = [int(i) for i in np.random.default_rng(3).integers(3, ref["n_vocab"], 80)]
    for prefix in (ids, ids[:5]):  # 80 rows: bulk path; 5 rows: the kernel
        want = reference_logits(ref, prefix)
        got = m.logits(prefix, all_positions=True)
        scale = np.abs(want).max()
        assert np.abs(want - got).max() < 0.04 * scale
        assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.999


# --- paged decode attention ----------------------------------------------------------------------------------

def _pool_case(dtype, d, hkv, group, lens, bs=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_per = [-(-n // bs) for n in lens]
    nblk = sum(blocks_per) + 3
    perm = torch.randperm(nblk, generator=gen)
    tables = torch.zeros(len(lens), max(blocks_per), dtype=torch.long)
    at = 0
    for i, b in enumerate(blocks_per):
        tables[i, :b] = perm[at : at + b]
        at += b
    kp = torch.randn(nblk * bs, hkv, d, generator=gen).to(dtype)
    vp = torch.randn(nblk * bs, hkv, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), hkv * group, d, generator=gen)
    return q, kp, vp, tables, torch.tensor(lens, dtype=torch.long)


def _sdpa_reference(q, kp, vp, tables, lens, bs, window, scale):
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        lo = max(0, n - window) if window else 0
        pos = torch.arange(lo, n)
        slots = tables[b][pos // bs] * bs + pos % bs
        k = kp[slots].double().transpose(0, 1)[None]
        v = vp[slots].double().transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[b : b + 1].double().unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        out.append(o[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,hkv,group", [(64, 3, 3), (256, 1, 4), (128, 2, 1)])
@pytest.mark.parametrize("window", [0, 7, 40])
def test_paged_attention_matches_sdpa(dtype, d, hkv, group, window):
    lens = [1, 5, 16, 17, 33, 100, 250]
    q, kp, vp, tables, lens_t = _pool_case(dtype, d, hkv, group, lens)
    out = native.extension().paged_attention(q, kp, vp, tables, lens_t, 16, window, d ** -0.5)
    ref = _sdpa_reference(q, kp, vp, tables, lens_t, 16, window, d ** -0.5)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_rows_do_not_depend_on_their_batch():
    lens = [3, 40, 41, 90, 200, 201, 64]
    q, kp, vp, tables, lens_t = _pool_case(torch.float16, 64, 3, 3, lens, seed=1)
    ext = native.extension()
    together = ext.paged_attention(q, kp, vp, tables, lens_t, 16, 0, 0.125)
    for b in range(len(lens)):
        alone = ext.paged_attention(q[b : b + 1].contiguous(), kp, vp, tables[b : b + 1].contiguous(),
                                    lens_t[b : b + 1].contiguous(), 16, 0, 0.125)
        assert torch.equal(alone[0], together[b])


def test_paged_attention_rejects_tables_out_of_range():
    q, kp, vp, tables, lens_t = _pool_case(torch.float16, 64, 1, 2, [20])
    tables[0, 1] = kp.shape[0]  # a block id past the pool
    with pytest.raises(RuntimeError, match="out of range"):
        native.extension().paged_attention(q, kp, vp, tables, lens_t, 16, 0, 0.125)
    with pytest.raises(RuntimeError, match="past the table"):
        native.extension().paged_attention(q, kp, vp, tables[:, :1].contiguous(), lens_t, 16, 0, 0.125)


@pytest.mark.parametrize("window", [0, 50])
def test_rows_of_one_sequence_share_reads_but_not_results(window):
    """Consecutive rows with the same block table (a verification's rows, a short chunk's rows) are attended
    together, reading each key once; each row must still equal the row computed alone, bit for bit."""
    q, kp, vp, tables, _ = _pool_case(torch.float16, 64, 3, 3, [300], seed=2)
    rows = 7
    q = torch.randn(rows, 9, 64, generator=torch.Generator().manual_seed(3))
    table = tables.expand(rows, -1).contiguous()
    lens = torch.arange(294, 294 + rows)
    ext = native.extension()
    together = ext.paged_attention(q, kp, vp, table, lens, 16, window, 0.125)
    for r in range(rows):
        alone = ext.paged_attention(q[r : r + 1].contiguous(), kp, vp, table[:1].contiguous(), lens[r : r + 1].contiguous(),
                                    16, window, 0.125)
        assert torch.equal(alone[0], together[r]), r
    ref = _sdpa_reference(q, kp, vp, table, lens, 16, window, 0.125)
    assert torch.allclose(together.double(), ref, rtol=1e-5, atol=1e-5)

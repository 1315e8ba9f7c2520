"""The many-row path over int4-packed weights (ember.kernels.int4_dense): unpacking must read torch's packing
exactly, the dequantized weight must be the int4 kernel's weight up to one bfloat16 rounding, and Int4Linear
must switch to it only for batches of many rows, and only when enabled."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import ember
from ember.kernels import int4_dense, native
from ember.kernels.linear import Int4Linear
from tiny_models import reference_logits, write_tiny_model


@pytest.fixture
def bulk(monkeypatch):
    """Force the path on (it is correct on any CPU, only not faster without bfloat16 instructions)."""
    monkeypatch.setenv("EMBER_BULK_BF16", "1")
    int4_dense.available.cache_clear()
    yield
    int4_dense.available.cache_clear()


@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (80, 64), (16, 32), (4096 + 48, 64)])
def test_unpack_reads_torch_packing(n, k):
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(int4_dense.unpack_rows(packed, 0, n, k).to(torch.int32), q)
    if n > 64:  # a slab starting at a later block, ending at the (possibly short) last one
        assert torch.equal(int4_dense.unpack_rows(packed, 64, n, k).to(torch.int32), q[64:])


def _random_linear(n: int, k: int, planes: int, seed: int = 0) -> tuple[Int4Linear, torch.Tensor]:
    """An Int4Linear and its exact float32 weight [n, k] as the int4 kernel defines it (bfloat16 scale/zero)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, planes * k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, planes * k // 32, generator=g) * 0.02 + 0.001
    zero = torch.randn(n, planes * k // 32, generator=g) * 0.01
    lin = Int4Linear(q, scale, zero, planes)
    sz = lin.scales_zeros.float()  # [groups, n, 2]
    w = (q.float() - 8) * sz[..., 0].t().repeat_interleave(32, 1) + sz[..., 1].t().repeat_interleave(32, 1)
    return lin, w.view(n, planes, k).sum(1)


@pytest.mark.parametrize("planes", [1, 2])
def test_dequantized_rows_are_the_kernel_weights_rounded_once(planes):
    lin, w = _random_linear(208, 96, planes)  # 3 full blocks and a 16-row tail
    got = int4_dense.dequantize_rows(lin.packed, lin.scales_zeros, planes, 0, 208)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, w.to(torch.bfloat16))
    assert torch.equal(int4_dense.dequantize_rows(lin.packed, lin.scales_zeros, planes, 128, 208),
                       w[128:].to(torch.bfloat16))


def test_matmul_over_slabs_equals_one_product(monkeypatch):
    lin, w = _random_linear(320, 64, 2, seed=1)
    x = torch.randn(70, 64).to(torch.bfloat16)
    whole = torch.nn.functional.linear(x, w.to(torch.bfloat16)).float()
    monkeypatch.setattr(int4_dense, "SLAB_WEIGHTS", 128 * 64)  # 64-row slabs: 5 of them
    assert int4_dense.slab_rows(320, 128) == 64
    assert torch.equal(int4_dense.matmul(x, lin.packed, lin.scales_zeros, 2), whole)


def test_linear_switches_by_row_count(bulk, monkeypatch):
    lin, w = _random_linear(128, 64, 2, seed=2)
    calls = []
    real = int4_dense.matmul
    monkeypatch.setattr(int4_dense, "matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, int4_dense.MIN_ROWS - 1, int4_dense.MIN_ROWS, 200):
        x = torch.randn(rows, 64)
        y = lin(x)
        ref = x.to(torch.bfloat16).float() @ w.t()
        # both forms agree with the exact product to bfloat16 accuracy of the weights and activations
        assert torch.allclose(y, ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))
    assert calls == [int4_dense.MIN_ROWS, 200]


def test_switch_off_keeps_the_int4_kernel(monkeypatch):
    monkeypatch.setenv("EMBER_BULK_BF16", "0")
    int4_dense.available.cache_clear()
    try:
        assert not int4_dense.available()
        lin, _ = _random_linear(64, 32, 1)
        monkeypatch.setattr(int4_dense, "matmul", lambda *a: pytest.fail("bulk path used while off"))
        lin(torch.randn(100, 32))
    finally:
        int4_dense.available.cache_clear()


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_1), ("llama", T.Q8_0), ("gemma3", T.Q5_0)])
def test_tiny_model_prompt_through_bulk_path_matches_reference(tmp_path, bulk, monkeypatch, arch, qtype):
    """A prompt long enough for the many-row path, against the float64 reference of tests/tiny_models.py.
    Native kernels off: this is the path of machines without them (tests/test_qdot.py covers theirs)."""
    monkeypatch.setattr(native, "extension", lambda: None)
    calls = []
    real = int4_dense.matmul
    monkeypatch.setattr(int4_dense, "matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_model(path, arch=arch, qtype=qtype, n_layer=2, window=4, seed=11)
    m = ember.load(path, n_ctx=128)
    ids = [int(i) for i in np.random.default_rng(3).integers(3, ref["n_vocab"], 80)]
    want = reference_logits(ref, ids)
    got = m.logits(ids, all_positions=True)
    scale = np.abs(want).max()
    assert np.abs(want - got).max() < 0.04 * scale
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.999
    assert calls and set(calls) == {80}  # the block projections (and the all-rows output) ran on it

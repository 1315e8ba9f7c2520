"""The native glue kernels (ember/kernels/csrc/glue.cpp): RMS norm, residual add + norm and gated activations,
against torch's formulas in float64 and for row independence (a row's result never depends on its batch)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import native
from ember.model.layers import FeedForward, RMSNorm

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need AVX-512 VNNI and a compiler")


def ext():
    return native.extension()


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("n", [576, 640, 64, 40])  # 40: a masked tail
def test_rms_norm_matches_the_formula(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g) * 3
    w = torch.randn(n, generator=g)
    out = ext().rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out.double(), _rms_ref(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    # a [T, H, d] view with outer strides (q or k heads inside a fused projection)
    qkv = torch.randn(5, 3 * 4 * 64, generator=g)
    heads = qkv[:, 4 * 64 : 8 * 64].view(5, 4, 64)
    wd = torch.randn(64, generator=g)
    torch.testing.assert_close(ext().rms_norm(heads, wd, 1e-6).double(), _rms_ref(heads, wd, 1e-6),
                               rtol=2e-6, atol=2e-6)


def test_add_rms_norm_returns_the_sum_and_its_norm():
    g = torch.Generator().manual_seed(1)
    x, d, w = torch.randn(9, 576, generator=g), torch.randn(9, 576, generator=g), torch.randn(576, generator=g)
    s, y = ext().add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(s, x + d)
    torch.testing.assert_close(y.double(), _rms_ref(x + d, w, 1e-5), rtol=2e-6, atol=2e-6)
    norm = RMSNorm(w, 1e-5)
    s2, y2 = norm.residual(x, d)
    assert torch.equal(s2, s) and torch.equal(y2, y)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_matches_torch_in_float64(activation):
    g = torch.Generator().manual_seed(2)
    n_ff = 1536 + 8  # a masked tail
    h = torch.randn(6, 2 * n_ff, generator=g) * 5
    act = (lambda a: F.silu(a)) if activation == "silu" else (lambda a: F.gelu(a, approximate="tanh"))
    out = ext().gated_act(h, n_ff, FeedForward.ACTIVATIONS.index(activation))
    ref = act(h[:, :n_ff].double()) * h[:, n_ff:].double()
    scale = (h[:, :n_ff] * h[:, n_ff:]).abs().double()
    assert ((out.double() - ref).abs() <= 1e-6 * scale + 1e-30).all()


def test_rows_do_not_depend_on_their_batch():
    g = torch.Generator().manual_seed(3)
    x, d, w = torch.randn(70, 576, generator=g), torch.randn(70, 576, generator=g), torch.randn(576, generator=g)
    h = torch.randn(70, 2 * 1536, generator=g)
    together = (ext().rms_norm(x, w, 1e-6), ext().add_rms_norm(x, d, w, 1e-6)[1], ext().gated_act(h, 1536, 0),
                ext().gated_act(h, 1536, 1))
    for r in (0, 33, 69):
        alone = (ext().rms_norm(x[r : r + 1], w, 1e-6), ext().add_rms_norm(x[r : r + 1], d[r : r + 1], w, 1e-6)[1],
                 ext().gated_act(h[r : r + 1], 1536, 0), ext().gated_act(h[r : r + 1], 1536, 1))
        for t, a in zip(together, alone):
            assert torch.equal(t[r : r + 1], a)


def test_bad_input_is_refused():
    with pytest.raises(RuntimeError):
        ext().rms_norm(torch.randn(4, 8, dtype=torch.float64), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError):
        ext().rms_norm(torch.randn(4, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError):
        ext().gated_act(torch.randn(4, 10), 6, 0)  # needs 2 * n_ff columns


def _rope_ref(x: torch.Tensor, pos: torch.Tensor, dim: int, style: str, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding from its definition in float64: pairs (adjacent for "norm", i and i + dim/2 for neox)
    rotated by pos * base^(-2j/dim)."""
    x = x.double()
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = pos.double()[:, None, None] * inv  # [T, 1, dim/2]
    c, s = ang.cos(), ang.sin()
    out = x.clone()
    if style == "norm":
        a, b = x[..., 0:dim:2], x[..., 1:dim:2]
        out[..., 0:dim:2], out[..., 1:dim:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., : dim // 2], x[..., dim // 2 : dim]
        out[..., : dim // 2], out[..., dim // 2 : dim] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("style", ["norm", "neox"])
@pytest.mark.parametrize("dim,head_dim", [(64, 64), (256, 256), (32, 64)])  # (32, 64): partial rotary
def test_rope_is_the_rotation_and_the_same_bits_as_torch(style, dim, head_dim):
    from ember.model.config import RopeConfig
    from ember.model.layers import Rope

    rope = Rope(RopeConfig(base=10000.0, dim=dim, style=style), 4096)
    g = torch.Generator().manual_seed(dim + head_dim)
    qkv = torch.randn(9, 14 * head_dim, generator=g) * 3
    heads = qkv[:, : 12 * head_dim].view(9, 12, head_dim)  # q and k heads inside a fused projection (strided)
    pos = torch.randint(0, 4096, (9,), generator=g)
    out = rope(heads, pos)  # the native kernel
    torch.testing.assert_close(out.double(), _rope_ref(heads, pos, dim, style), rtol=0, atol=2e-5)
    cos, sin = rope.cos[pos][:, None, :], rope.sin[pos][:, None, :]  # torch's ops, as the fallback runs them
    rot = heads[..., :dim]
    partner = rope._swap(rot)
    torch_out = torch.cat((torch.addcmul(rot * cos, partner, sin), heads[..., dim:]), dim=-1)
    assert torch.equal(out, torch_out)
    one = rope(heads[4:5].contiguous(), pos[4:5].clone())  # a row alone: the same result as in the batch
    assert torch.equal(one[0], out[4])

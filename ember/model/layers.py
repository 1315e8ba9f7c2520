"""Building blocks shared by every architecture: norms, rotary embeddings, attention and feed-forward.

Shapes: a forward pass works on one flat run of T tokens; hidden states are float32 [T, n_embd], attention
heads [T, heads, head_dim]. Weights are Linear objects from ember.kernels.linear (quantized or dense).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels import native
from ember.kernels.linear import Linear
from ember.model.config import RopeConfig
from ember.model.kv_cache import KVCache


def _rows(x: torch.Tensor) -> bool:
    """Whether the native glue kernels take x: float32 [T, n] or [T, H, n] with the last dimension contiguous."""
    return x.dtype == torch.float32 and x.dim() in (2, 3) and x.stride(-1) == 1


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight.float().contiguous()
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * w in float32: ember/kernels/csrc/glue.cpp where the native kernels run
        # (one call; torch's rms_norm costs 13-40 us a call at decode sizes), else torch's fused kernel.
        ext = native.extension()
        if ext is not None and _rows(x):
            return ext.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def residual(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's residual step: (x + delta, this norm of it), in one native call where possible."""
        ext = native.extension()
        if ext is not None and _rows(x) and _rows(delta) and x.dim() == 2 and x.shape == delta.shape:
            return ext.add_rms_norm(x, delta, self.weight, self.eps)
        s = x + delta
        return s, self(s)


class Rope:
    """Rotary embedding with precomputed cos/sin tables for positions [0, n_ctx).

    Applied as x * cos + swap(x) * sin over the rotated dims, with the tables stored at full rotary width
    (each angle's cos twice; sin with the sign of its slot) so that a call is a handful of ops: single-token
    decode is bound by per-op overhead, not arithmetic. The rows for a positions tensor are looked up once
    and reused by every layer of the pass (memo keyed by the tensor object, which it keeps alive so the key
    cannot be reused; positions tensors are never modified in place)."""

    def __init__(self, cfg: RopeConfig, n_ctx: int, freq_factors: torch.Tensor | None = None):
        self.dim = cfg.dim
        self.style = cfg.style
        inv_freq = cfg.base ** (-torch.arange(0, cfg.dim, 2, dtype=torch.float64) / cfg.dim)
        if freq_factors is not None:  # llama 3.1-style long-context factors (tensor rope_freqs.weight)
            inv_freq = inv_freq / freq_factors.double()
        pos = torch.arange(n_ctx, dtype=torch.float64) / cfg.scale
        angles = pos[:, None] * inv_freq[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()  # [n_ctx, dim/2]
        if self.style == "norm":  # adjacent pairs (a, b) -> (a cos - b sin, a sin + b cos)
            self.cos = torch.stack((cos, cos), -1).flatten(-2)
            self.sin = torch.stack((-sin, sin), -1).flatten(-2)
        else:  # neox: first half pairs with second half
            self.cos = torch.cat((cos, cos), -1)
            self.sin = torch.cat((-sin, sin), -1)
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows of the positions: [T, dim] each."""
        m = self._memo
        if m is None or m[0] is not positions:
            m = self._memo = (positions, self.cos[positions], self.sin[positions])
        return m[1], m[2]

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        """The partner of each rotated element: (a, b) -> (b, a) per pair."""
        if self.style == "norm":
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        half = self.dim // 2
        return torch.cat((x[..., half:], x[..., :half]), dim=-1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, head_dim] float32 -> rotated copy."""
        cos, sin = self._tables(positions)
        ext = native.extension()
        if ext is not None and _rows(x) and x.dim() == 3 and self.dim % (32 if self.style == "neox" else 16) == 0:
            return ext.rope(x, cos, sin, self.style == "neox")  # one call, the same bits as below
        cos, sin = cos[:, None, :], sin[:, None, :]
        if x.shape[-1] == self.dim:
            return torch.addcmul(x * cos, self._swap(x), sin)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((torch.addcmul(rot * cos, self._swap(rot), sin), rest), dim=-1)


class Attention:
    def __init__(
        self,
        layer: int,
        wqkv: Linear,
        wo: Linear,
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        value_dim: int,
        rope: Rope,
        scale: float,
        window: int = 0,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ):
        self.layer = layer
        self.wqkv, self.wo = wqkv, wo  # q, k and v projections fused along the output dimension
        self.n_head, self.n_head_kv = n_head, n_head_kv
        self.head_dim, self.value_dim = head_dim, value_dim
        self.rope = rope
        self.scale = scale
        self.window = window
        self.q_norm, self.k_norm = q_norm, k_norm

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        nq, nk = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        qkv = self.wqkv(x)
        v = qkv[:, nq + nk :].view(t, self.n_head_kv, self.value_dim)
        if self.q_norm is None and self.k_norm is None:
            # q and k are adjacent in the fused projection: rotate both heads' sets in one pass
            qk = self.rope(qkv[:, : nq + nk].view(t, self.n_head + self.n_head_kv, self.head_dim), positions)
            q, k = qk[:, : self.n_head], qk[:, self.n_head :]
        else:
            q = qkv[:, :nq].view(t, self.n_head, self.head_dim)
            k = qkv[:, nq : nq + nk].view(t, self.n_head_kv, self.head_dim)
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
        out = cache.attend(self.layer, q, k, v, positions, self.scale, self.window)
        return self.wo(out.reshape(t, self.n_head * self.value_dim))


class FeedForward:
    """Gated feed-forward: down(act(gate(x)) * up(x)), gate and up fused into one projection."""

    ACTIVATIONS = ("silu", "gelu_tanh")  # the native gated_act's codes 0 and 1

    def __init__(self, gate_up: Linear, down: Linear, activation: str):
        self.gate_up, self.down = gate_up, down
        self.n_ff = down.in_features
        if activation == "silu":
            self.act = F.silu
        elif activation == "gelu_tanh":
            self.act = lambda h: F.gelu(h, approximate="tanh")
        else:
            raise ValueError(f"unknown activation {activation}")
        self.act_code = self.ACTIVATIONS.index(activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        ext = native.extension()
        if ext is not None and _rows(h) and h.dim() == 2:
            return self.down(ext.gated_act(h, self.n_ff, self.act_code))
        return self.down(self.act(h[:, : self.n_ff]) * h[:, self.n_ff :])

"""Linear layers over quantized GGUF weights, repacked once at load into the fastest exact form we have.

Forms (chosen per tensor type by `make_linear`):
- Int4Linear: Q4_0 / Q4_1 / Q4_K become torch's packed int4 group-32 layout. Each of these formats is exactly
  w = (q - 8) * scale + zero per 32-weight group (see ember.quant.int4_groups), which is the formula of
  torch's `_weight_int4pack_mm_for_cpu`. Activations run in bfloat16 (the kernel's fast path); scales and
  zeros are stored in bfloat16 too, the only rounding this form adds.
- DenseLinear: every other type is dequantized exactly and stored as bfloat16 for torch's GEMM/GEMV.

Invariant: a Linear takes float32 or bfloat16 activations [T, in_features] and returns float32 [T, out].
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.quant import dequantize, int4_groups

INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
GROUP = 32
COMPUTE_DTYPE = torch.bfloat16


class Linear:
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def nbytes(self) -> int:  # bytes of weight data read per forward pass
        raise NotImplementedError


class Int4Linear(Linear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        n, k = q.shape
        self.out_features, self.in_features = n, k
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # kernel layout: [K / group, N, 2] holding (scale, zero)
        self.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), self.packed, GROUP, self.scales_zeros).float()
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


class DenseLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.weight = weight.to(COMPUTE_DTYPE).contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(COMPUTE_DTYPE), self.weight).float()
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def int4_supported(qtype: int, shape: tuple[int, ...]) -> bool:
    # torch's CPU int4 packing needs N % 16 == 0 and whole 32-groups along K.
    return qtype in INT4_TYPES and len(shape) == 2 and shape[0] % GROUP == 0 and shape[1] % 16 == 0


def make_linear(raw: np.ndarray, qtype: int, shape: tuple[int, ...], bias: torch.Tensor | None = None) -> Linear:
    """Repack one GGUF weight (ggml shape (in, out)) into the fastest exact Linear for its type."""
    qtype = T(qtype)
    if int4_supported(qtype, shape):
        q, scale, zero = int4_groups(raw, qtype, shape)
        return Int4Linear(q, scale, zero, bias)
    return DenseLinear(dequantize(raw, qtype, shape), bias)

"""Linear layers over quantized GGUF weights, repacked once at load into the fastest exact form we have.

Forms (chosen per tensor type):
- Int4Linear: torch's packed int4 group-32 kernel (`_weight_int4pack_mm_for_cpu`, w = (q - 8) * scale + zero).
  Q4_0 / Q4_1 / Q4_K map onto it directly (one plane). Q5_0 / Q5_1 / Q8_0 split exactly into two int4
  planes (ember.quant.split_int4_planes); the planes are laid side by side along K and the input is
  repeated, since W x = W_hi x + W_lo x = [W_hi | W_lo] [x; x]. So 5- and 8-bit types also run in one kernel
  call at ~1 byte per weight instead of 2 for bfloat16. Activations, scales and zeros are bfloat16 (the
  kernel's fast path): the only rounding this form adds. Batches of many rows (prompt processing, >= 64)
  instead dequantize slabs of the packed weight to bfloat16 and use torch's GEMM (ember.kernels.int4_dense:
  3-5x faster there on CPUs with bfloat16 instructions; nothing extra stays resident).
- DenseLinear: every other type (Q6_K, K-quants with 16-wide sub-blocks, F16, F32...) is dequantized
  exactly and stored as bfloat16 for torch's GEMM.
Several projections that read the same input (q/k/v, gate/up) are fused into one Linear along N when their
forms agree, which saves kernel launches and a pass over the activations.

Invariant: a Linear takes float32 or bfloat16 activations [T, in_features] and returns float32 [T, out].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from ember.kernels import int4_dense
from ember.quant import dequantize, split_int4_planes

if TYPE_CHECKING:
    from ember.kernels.qdot import QDotParts

PLANE_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q8_0})
GROUP = 32
COMPUTE_DTYPE = torch.bfloat16


class Linear:
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def nbytes(self) -> int:  # bytes of weight data read per forward pass
        raise NotImplementedError

    def state(self) -> dict:  # pragma: no cover - interface
        """Tensors and sizes that rebuild this Linear without repacking (see linear_from_state)."""
        raise NotImplementedError


_exact = threading.local()


@contextmanager
def int4_kernel_rows(rows: torch.Tensor | None) -> Iterator[None]:
    """Within the block, rows `rows` of every Int4Linear input take the int4 kernel even when the batch is
    large enough for the dense bfloat16 path. The engine marks decode rows this way: a decode row's result
    must not depend on whether a long prefill chunk shares its step (greedy output would then depend on the
    batch), and alone it would have taken the int4 kernel."""
    previous = getattr(_exact, "rows", None)
    _exact.rows = rows
    try:
        yield
    finally:
        _exact.rows = previous


def decode_rows() -> torch.Tensor | None:
    """The rows int4_kernel_rows marked in this thread (None outside such a block)."""
    return getattr(_exact, "rows", None)


class Int4Linear(Linear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, planes: int,
                 bias: torch.Tensor | None = None):
        """q uint8 [N, planes * K] in 0..15; scale/zero [N, planes * K / 32]."""
        n, pk = q.shape
        self.planes = planes
        self.out_features, self.in_features = n, pk // planes
        self.packed = _pack_int4(q)
        # kernel layout: [K / group, N, 2] holding (scale, zero)
        self.scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        self.bias = bias

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales_zeros: torch.Tensor, planes: int, in_features: int,
                    bias: torch.Tensor | None = None) -> "Int4Linear":
        """An Int4Linear over tensors already in the kernel's layout (e.g. from ember.model.pack_cache)."""
        self = cls.__new__(cls)
        n = scales_zeros.shape[1]
        if scales_zeros.shape != (planes * in_features // GROUP, n, 2) or packed.shape[0] != n:
            raise ValueError("packed int4 tensors do not match their sizes")
        self.planes, self.out_features, self.in_features = planes, n, in_features
        self.packed, self.scales_zeros, self.bias = packed, scales_zeros, bias
        return self

    def state(self) -> dict:
        return {"kind": "int4", "packed": self.packed, "scales_zeros": self.scales_zeros,
                "planes": self.planes, "in_features": self.in_features, "bias": self.bias}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(COMPUTE_DTYPE)
        rows = getattr(_exact, "rows", None)
        n_exact = 0 if rows is None else rows.numel()
        if x.shape[0] - n_exact >= int4_dense.MIN_ROWS and int4_dense.available():
            # many rows (prompt processing): dequantized slabs + bfloat16 GEMM, see ember.kernels.int4_dense
            if n_exact:
                keep = torch.ones(x.shape[0], dtype=torch.bool)
                keep[rows] = False
                y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
                y[keep] = int4_dense.matmul(x[keep], self.packed, self.scales_zeros, self.planes)
                y[rows] = self._kernel(x[rows])
            else:
                y = int4_dense.matmul(x, self.packed, self.scales_zeros, self.planes)
        else:
            y = self._kernel(x)
        return y if self.bias is None else y + self.bias

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes > 1:
            x = x.repeat(1, self.planes)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros).float()

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


def _pack_int4(q: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """torch's packing wants int32 codes (4x the uint8 size: 1.3 GB for gemma3's tied output); rows pack
    independently, so convert and pack a slab of rows at a time."""
    return torch.cat([
        torch._convert_weight_to_int4pack_for_cpu(q[i : i + rows].to(torch.int32), 1)
        for i in range(0, q.shape[0], rows)
    ])


class DenseLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.weight = weight.to(COMPUTE_DTYPE).contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(COMPUTE_DTYPE)
        if x.shape[0] == 1:
            # torch's bf16 GEMV path rounds differently from its GEMM path; running one row as two keeps a
            # token's result independent of how many rows its batch had (measured: no speed cost).
            return self(x.expand(2, -1))[:1]
        y = torch.nn.functional.linear(x, self.weight).float()
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def state(self) -> dict:
        return {"kind": "dense", "weight": self.weight, "bias": self.bias}


def linear_from_state(state: dict) -> Linear:
    """Inverse of Linear.state(). Raises KeyError/ValueError on a state this code did not write."""
    if state["kind"] == "int4":
        return Int4Linear.from_packed(state["packed"], state["scales_zeros"], int(state["planes"]),
                                      int(state["in_features"]), state["bias"])
    if state["kind"] == "qdot":
        from ember.kernels import qdot  # qdot builds on this module: imported where used

        if not qdot.available():
            raise ValueError("qdot kernel not available in this process")
        return qdot.QDotLinear(state["codes"], state["scales"], state["mins"], int(state["bits"]),
                               int(state["in_features"]), state["bias"], offset=state.get("offset"),
                               scale_codes=state.get("scale_codes"), min_codes=state.get("min_codes"))
    if state["kind"] == "dense":
        weight = state["weight"]
        if weight.dtype != COMPUTE_DTYPE or weight.dim() != 2:
            raise ValueError("dense weight of the wrong type")
        return DenseLinear(weight, state["bias"])
    raise ValueError(f"unknown linear kind {state['kind']!r}")


@dataclass
class WeightParts:
    """One GGUF weight unpacked for the kernel it will use, before packing (so parts can be fused)."""

    out_features: int
    in_features: int
    planes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # int4 form
    dense: torch.Tensor | None  # float32 [N, K] otherwise
    bias: torch.Tensor | None
    qdot: "QDotParts | None" = None  # the qdot kernel's form (preferred where the kernel is available)


def _int4_fits(qtype: T, shape: tuple[int, ...]) -> bool:
    # torch's CPU int4 packing needs whole 32-groups along K and N % 16 == 0.
    return qtype in PLANE_TYPES and len(shape) == 2 and shape[0] % GROUP == 0 and shape[1] % 16 == 0


def weight_parts(raw: np.ndarray, qtype: int, shape: tuple[int, ...], bias: torch.Tensor | None = None) -> WeightParts:
    from ember.kernels import qdot

    qtype = T(qtype)
    k, n = shape
    if qdot.supports(qtype, shape) and qdot.available():
        return WeightParts(n, k, None, None, bias, qdot.parts_from_gguf(raw, qtype, shape))
    if _int4_fits(qtype, shape):
        return WeightParts(n, k, split_int4_planes(raw, qtype, shape), None, bias)
    return WeightParts(n, k, None, dequantize(raw, qtype, shape), bias)


def build_linear(parts: list[WeightParts]) -> Linear:
    """One Linear computing the concatenation of the parts' outputs (fused along N when there are several)."""
    k = parts[0].in_features
    assert all(p.in_features == k for p in parts)
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
    if all(p.qdot is not None for p in parts):
        from ember.kernels.qdot import QDotLinear

        return QDotLinear.from_parts([p.qdot for p in parts], bias)
    n_planes = {len(p.planes) if p.planes is not None else 0 for p in parts}
    if len(n_planes) == 1 and 0 not in n_planes:
        planes = n_planes.pop()
        # per part: planes side by side along K; parts stacked along N
        q = torch.cat([torch.cat([pl[0] for pl in p.planes], dim=1) for p in parts], dim=0)
        scale = torch.cat([torch.cat([pl[1] for pl in p.planes], dim=1) for p in parts], dim=0)
        zero = torch.cat([torch.cat([pl[2] for pl in p.planes], dim=1) for p in parts], dim=0)
        return Int4Linear(q, scale, zero, planes, bias)
    dense = [p.dense if p.dense is not None else _planes_to_dense(p.planes) if p.planes is not None
             else _qdot_to_dense(p.qdot) for p in parts]
    return DenseLinear(torch.cat(dense, dim=0), bias)


def _qdot_to_dense(parts: "QDotParts") -> torch.Tensor:
    n, k = parts.u.shape
    return (parts.u.float().view(n, k // GROUP, GROUP) * parts.s[..., None] + parts.z[..., None]).view(n, k)


def _planes_to_dense(planes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    total = None
    for q, scale, zero in planes:
        n, k = q.shape
        w = ((q.float() - 8).view(n, k // GROUP, GROUP) * scale[..., None] + zero[..., None]).view(n, k)
        total = w if total is None else total + w
    return total


def make_linear(raw: np.ndarray, qtype: int, shape: tuple[int, ...], bias: torch.Tensor | None = None) -> Linear:
    """Repack one GGUF weight (ggml shape (in, out)) into the fastest exact Linear for its type."""
    return build_linear([weight_parts(raw, qtype, shape, bias)])

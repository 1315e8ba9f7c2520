"""Token embedding lookup straight from the GGUF bytes.

The table stays in its file type (memory-mapped, never copied whole): a lookup gathers the quantized rows
of the requested tokens and dequantizes only those, so the result is exact and costs O(tokens x n_embd).
"""
from __future__ import annotations

import numpy as np
import torch

from ember.quant import dequantize


class Embedding:
    def __init__(self, rows: np.ndarray, qtype: int, dim: int):
        """rows: uint8 [n_vocab, row_bytes] view of the tensor's bytes."""
        self.rows = rows
        self.qtype = qtype
        self.dim = dim
        self.n_vocab = rows.shape[0]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.numpy()
        picked = np.ascontiguousarray(self.rows[ids])
        return dequantize(picked, self.qtype, (self.dim, len(ids))).reshape(len(ids), self.dim)

"""Typed access to a GGUF file's tensors for the architecture builders.

Builders ask for tensors by GGUF name; this class checks presence and shape against the config, so a file
with a missing or misshapen tensor fails with the tensor's name instead of a broadcasting error later.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ember.errors import GGUFError, UnsupportedError
from ember.kernels.embedding import Embedding
from ember.kernels.linear import Linear, WeightParts, build_linear, weight_parts
from ember.quant import FORMATS, dequantize


class Weights:
    def __init__(self, gguf_file):
        self.file = gguf_file
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.file.tensors.get(name)
        if info is None:
            raise GGUFError(f"tensor {name!r} is missing")
        if tuple(info.shape) != tuple(shape):
            raise GGUFError(f"tensor {name!r} has shape {tuple(info.shape)}, expected {tuple(shape)}")
        if info.ggml_type not in FORMATS:
            raise UnsupportedError(f"tensor {name!r} has unsupported type {info.type_name}")
        self.used.add(name)
        return info

    def raw(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, T]:
        info = self._info(name, shape)
        return self.file.tensor_bytes(name), T(info.ggml_type)

    def vector(self, name: str, size: int) -> torch.Tensor:
        raw, qtype = self.raw(name, (size,))
        return dequantize(raw, qtype, (size,)).reshape(size).clone()

    def optional_vector(self, name: str, size: int) -> torch.Tensor | None:
        return self.vector(name, size) if self.has(name) else None

    def parts(self, name: str, n_in: int, n_out: int, bias: str | None = None) -> WeightParts:
        raw, qtype = self.raw(name, (n_in, n_out))
        b = self.optional_vector(bias, n_out) if bias else None
        return weight_parts(raw, qtype, (n_in, n_out), b)

    def linear(self, name: str, n_in: int, n_out: int, bias: str | None = None) -> Linear:
        return build_linear([self.parts(name, n_in, n_out, bias)])

    def fused(self, specs: list[tuple[str, int, int, str | None]]) -> Linear:
        """One Linear for several weights that read the same input: outputs concatenated in order."""
        return build_linear([self.parts(*spec) for spec in specs])

    def embedding(self, name: str, dim: int, n_vocab: int) -> Embedding:
        raw, qtype = self.raw(name, (dim, n_vocab))
        return Embedding(raw.reshape(n_vocab, -1), qtype, dim)

"""GGML quantization formats: the format table, bit-exact float32 dequantization, and the integer-group
decompositions that Ember's fast kernels consume.

    formats  - FORMATS: ggml type -> block size, bytes per block, bits per weight
    dequant  - dequantize / dequantize_rows: vectorized torch, chunked, exact against ggml
    repack   - int4_groups / int8_groups / split_int4_planes: (q, scale, zero) views for int kernels

The names below are imported on first use (PEP 562): dequant and repack import torch, which costs about a
second, and `ember quantize` from F16/BF16/F32 files, `ember --help` (it lists the quantization types from
ember.quant.mix) and the store commands never need it.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAST_TYPES": "ember.quant.dequant",
    "dequantize": "ember.quant.dequant",
    "dequantize_rows": "ember.quant.dequant",
    "FORMATS": "ember.quant.formats",
    "QuantFormat": "ember.quant.formats",
    "format_of": "ember.quant.formats",
    "int4_groups": "ember.quant.repack",
    "int8_groups": "ember.quant.repack",
    "split_int4_planes": "ember.quant.repack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

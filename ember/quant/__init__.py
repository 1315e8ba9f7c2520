"""GGML quantization formats: the format table, bit-exact float32 dequantization, and the integer-group
decompositions that Ember's fast kernels consume.

    formats  - FORMATS: ggml type -> block size, bytes per block, bits per weight
    dequant  - dequantize / dequantize_rows: vectorized torch, chunked, exact against ggml
    repack   - int4_groups / int8_groups / split_int4_planes: (q, scale, zero) views for int kernels
"""
from ember.quant.dequant import FAST_TYPES, dequantize, dequantize_rows
from ember.quant.formats import FORMATS, QuantFormat, format_of
from ember.quant.repack import int4_groups, int8_groups, split_int4_planes

__all__ = [
    "FAST_TYPES",
    "FORMATS",
    "QuantFormat",
    "dequantize",
    "dequantize_rows",
    "format_of",
    "int4_groups",
    "int8_groups",
    "split_int4_planes",
]

"""Ember's native CPU kernels (ember/kernels/csrc), compiled on first use and loaded into this process.

The kernels are AVX-512 VNNI code (qdot.cpp: quantized matmul; paged_attention.cpp: decode attention through
block tables; glue.cpp: RMS norm, residual add, gated activation and rotary embedding between the matmuls).
torch.utils.cpp_extension builds them once per machine and source version (cached under
~/.cache/torch_extensions, ~30 s) with OpenMP through torch's own libgomp, so they share torch's thread pool.

`extension()` is None where they cannot run - a CPU without AVX-512 VNNI, no C++ compiler, a non-Linux
system, or EMBER_NATIVE=0 - and every caller then keeps torch's own kernels (the int4 kernel, SDPA).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "module.cpp", CSRC / "qdot.cpp", CSRC / "paged_attention.cpp", CSRC / "glue.cpp")
HEADERS = (CSRC / "simd.h",)
# Exact prefill (default; EMBER_EXACT_PREFILL=0 turns it off): every prompt row is computed like a decode row -
# the qdot kernel and one attention row each - so a token's logits depend only on the tokens before it, never
# on the batch, the chunking or the prefix cache: greedy output alone and in any batch is the same text. Costs
# prompt speed (SmolLM2 pp512 ~1270 -> ~960 t/s, gemma3 ~1360 -> ~780 here) against bfloat16 GEMM + SDPA for
# long chunks. Off, only chunks shorter than 64 tokens (below int4_dense.MIN_ROWS, where products take the
# small-batch kernels anyway) are computed row by row.
EXACT = os.environ.get("EMBER_EXACT_PREFILL", "1").strip().lower() not in ("0", "off", "false", "no")
SHORT_CHUNK = 64


def row_chunk() -> int:
    """Chunks shorter than this are computed row by row (where the native kernels run)."""
    return 1 << 62 if EXACT else SHORT_CHUNK


REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def enabled_by_env() -> bool:
    return os.environ.get("EMBER_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module, or None when the native kernels cannot be used here."""
    if not enabled_by_env() or sys.platform != "linux" or not set(REQUIRED_FLAGS) <= _cpu_flags():
        return None
    try:
        from torch.utils import cpp_extension

        _say_if_building(cpp_extension)
        return cpp_extension.load(
            name="ember_native",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c",
                          "-mfma", "-ffp-contract=off", "-fopenmp", f"-DEMBER_HEADERS={_headers_digest()}"],
            # at::parallel_for is OpenMP inside torch's headers: without -fopenmp it would run on one thread.
            # libgomp is found by its soname, i.e. the copy torch already loaded: one thread pool per process.
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler or headers: torch's kernels serve instead
        print(f"ember: native kernels unavailable ({type(exc).__name__}: {exc}); using torch's kernels",
              file=sys.stderr)
        return None


def _headers_digest() -> str:
    """torch rebuilds an extension when a source file or a build flag changes, not when a header does: the
    headers' digest goes into the flags."""
    h = hashlib.sha256()
    for path in HEADERS:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _say_if_building(cpp_extension) -> None:
    """One line on stderr when no build of the kernels exists yet: the first model load then takes ~30 s
    longer, and a user should know why. (A changed source is rebuilt silently: a rarer, developer's case.)"""
    try:
        built = Path(cpp_extension._get_build_directory("ember_native", False)) / "ember_native.so"
    except Exception:  # a private helper of torch's: if it moved, just skip the message
        return
    if not built.exists():
        print("ember: building native CPU kernels (once per machine, about 30 s)...", file=sys.stderr, flush=True)


def available() -> bool:
    return extension() is not None

"""`ember quantize IN OUT TYPE`: convert a GGUF model to a llama.cpp file type (the logic is ember.quant.quantize).

    ember quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M [--allow-requantize] [-t N] [-q]

One progress line per tensor and a summary go to stderr (stdout stays empty). Also runnable as
`python -m ember.cli.quantize ...`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

MiB = 1 << 20


def _type_names() -> str:
    from ember.quant.mix import FILE_TYPES

    return ", ".join(FILE_TYPES)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="GGUF model to read (F32/F16/BF16, or quantized with "
                   "--allow-requantize)")
    p.add_argument("output", metavar="OUT", help="GGUF file to write (replaced if it exists)")
    p.add_argument("type", metavar="TYPE", help=f"llama.cpp file type: {_type_names()}")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow re-quantizing tensors that are already quantized (loses quality)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="worker threads (default: the cores this process may use)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-tensor progress, only the summary")


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register `quantize` on the main CLI's subparsers; the handler is `run`."""
    p = subparsers.add_parser(
        "quantize",
        parents=list(parents),
        help="quantize a GGUF model (llama.cpp-identical output)",
        description="Quantize a GGUF model to a llama.cpp file type. Tensor types follow llama.cpp's "
        "per-tensor mix for that type, and the tensor data is byte-identical to llama-quantize's.",
    )
    _configure(p)
    p.set_defaults(handler=run)
    return p


def _progress_line(ev: Any) -> str:
    shape = ", ".join(str(d) for d in ev.shape)
    change = f"{ev.src_type} -> {ev.dst_type}" if ev.src_type != ev.dst_type else f"{ev.src_type} (copied)"
    width = len(str(ev.count))
    return (f"[{ev.index:>{width}}/{ev.count}] {ev.name:<36} [{shape}] {change}, "
            f"{ev.src_bytes / MiB:.2f} MiB -> {ev.dst_bytes / MiB:.2f} MiB ({ev.seconds:.2f} s)")


def run(args: argparse.Namespace) -> int:
    from ember.errors import InvalidParameterError
    from ember.quant.mix import file_type
    from ember.quant.quantize import quantize_file

    ft = file_type(args.type)  # a bad TYPE fails before any file is touched
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError("-t must be >= 1")

    def show(ev: Any) -> None:
        print(_progress_line(ev), file=sys.stderr, flush=True)

    result = quantize_file(args.input, args.output, ft, allow_requantize=args.allow_requantize,
                           threads=args.threads, progress=None if args.quiet else show)
    if result.fallbacks:
        print(f"warning: {len(result.fallbacks)} of {result.n_tensors} tensors have rows that do not fit their "
              f"type's block and fell back to another type: {', '.join(result.fallbacks)}", file=sys.stderr)
    print(f"{args.input} -> {args.output} ({result.file_type}): {result.src_bytes / MiB:.2f} MiB -> "
          f"{result.dst_bytes / MiB:.2f} MiB in {result.seconds:.2f} s", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m ember.cli.quantize`): the main CLI's `quantize` command, its error handling included."""
    from ember.cli.main import main as ember_main

    return ember_main(["quantize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

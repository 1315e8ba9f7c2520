"""`ember bench MODEL`: llama-bench-style speed test (arguments and printing; the logic is ember.bench).

    ember bench smollm2 -p 512 -n 128 -r 5 -t 2 -o table|json|csv

Also runnable as `python -m ember.cli.bench ...` so benchmark scripts work before/without the main CLI.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

OUTPUTS = ("table", "json", "csv")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model name or .gguf path")
    p.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N",
                   help="prompt tokens for the pp test (0 skips it; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, metavar="N",
                   help="generated tokens for the tg test (0 skips it; default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N", help="runs per test (default 5)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: the cores this process may use)")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="output format (default table)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context size to allocate (default: enough for the larger test)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each test")
    p.add_argument("--bandwidth-mb", type=int, default=1024, metavar="MB",
                   help="size of the memory-bandwidth probe (0 skips it; default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random token ids")
    p.add_argument("--progress", action="store_true", help="print progress to stderr")
    p.add_argument("--speculative", choices=("ngram", "draft"), default=None,
                   help="also run sgN: engine generation on a copyable prompt, plain vs speculative, with "
                        "acceptance rate and tokens per verification step")
    p.add_argument("--draft", metavar="MODEL", default=None, help="draft model for --speculative draft")


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register `bench` on the main CLI's subparsers; the handler is `run`."""
    p = subparsers.add_parser(
        "bench",
        parents=list(parents),
        help="measure prompt-processing and generation speed (llama-bench style)",
        description="Measure single-stream speed: prompt processing of N random tokens (ppN) and generation "
        "of M tokens (tgM), each repeated, reported as mean ± std tokens/s.",
    )
    _configure(p)
    p.set_defaults(handler=run)
    return p


def _validate(args: argparse.Namespace) -> None:
    from ember.errors import InvalidParameterError

    if args.n_prompt < 0 or args.n_gen < 0:
        raise InvalidParameterError("-p and -n must be >= 0")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise InvalidParameterError("nothing to measure: -p and -n are both 0")
    if args.repetitions < 1:
        raise InvalidParameterError("-r must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError("-t must be >= 1")
    if args.bandwidth_mb < 0:
        raise InvalidParameterError("--bandwidth-mb must be >= 0")


def run(args: argparse.Namespace) -> int:
    from ember.bench import BenchConfig, run_bench

    _validate(args)
    cfg = BenchConfig(
        model=args.model,
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        repetitions=args.repetitions,
        threads=args.threads,
        n_ctx=args.ctx,
        warmup=not args.no_warmup,
        bandwidth_bytes=args.bandwidth_mb << 20,
        seed=args.seed,
        speculative=args.speculative,
        draft=args.draft,
    )
    log = (lambda msg: print(f"ember bench: {msg}", file=sys.stderr, flush=True)) if args.progress else None
    report = run_bench(cfg, log)
    out = {"table": format_table, "json": format_json, "csv": format_csv}[args.output](report)
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


# -- formats -----------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


def _gbs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} GB/s"


def format_table(report: Any) -> str:
    """Markdown table like llama-bench's, then one line per non-speed measurement."""
    header = ["model", "size", "params", "threads", "test", "t/s", "weights GB/s"]
    rows = []
    for t in report.tests:
        bw = report.weight_bytes_per_token * t.avg_ts / 1e9 if t.n_gen else None
        rows.append([
            f"{report.architecture} {report.quantization}",
            _gib(report.file_size),
            f"{report.parameters / 1e6:.2f} M",
            str(report.threads),
            t.name,
            f"{t.avg_ts:.2f} ± {t.stddev_ts:.2f}",
            "-" if bw is None else f"{bw:.1f}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {2, 3, 5, 6}  # numbers right-aligned, as llama-bench

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    lines = [line(header), sep] + [line(r) for r in rows]
    lines += [
        "",
        f"model: {report.model} ({report.path})",
        f"load time: {report.load_seconds:.3f} s ({report.weights_source})",
        f"peak RSS: {_gib(report.peak_rss_bytes)}",
        f"weights read per token: {_gib(report.weight_bytes_per_token)}",
        f"generation weight bandwidth: {_gbs(report.tg_bandwidth_gbs)}"
        f"  (machine: {_gbs(report.mem_bandwidth_gbs)} 1 thread, "
        f"{_gbs(report.mem_bandwidth_threads_gbs)} {report.threads} threads)",
    ]
    for t in report.tests:
        if t.acceptance is not None:
            lines.append(f"{t.name}: draft acceptance {100 * t.acceptance:.1f}%, "
                         f"{t.tokens_per_step:.2f} tokens per verification step")
    return "\n".join(lines) + "\n"


def format_json(report: Any) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


CSV_FIELDS = [
    "model", "path", "architecture", "quantization", "parameters", "file_size", "threads", "n_ctx", "test",
    "n_prompt", "n_gen", "repetitions", "avg_ts", "stddev_ts", "avg_s", "load_seconds", "weights_source",
    "peak_rss_bytes",
    "weight_bytes_per_token", "weight_bandwidth_gbs", "mem_bandwidth_gbs", "mem_bandwidth_threads_gbs",
]


def format_csv(report: Any) -> str:
    """One row per test; the per-model fields repeat on each row so rows stand alone."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in report.tests:
        w.writerow({
            "model": report.model, "path": report.path, "architecture": report.architecture,
            "quantization": report.quantization, "parameters": report.parameters, "file_size": report.file_size,
            "threads": report.threads, "n_ctx": report.n_ctx, "test": t.name, "n_prompt": t.n_prompt,
            "n_gen": t.n_gen, "repetitions": len(t.samples_s), "avg_ts": f"{t.avg_ts:.4f}",
            "stddev_ts": f"{t.stddev_ts:.4f}", "avg_s": f"{sum(t.samples_s) / len(t.samples_s):.6f}",
            "load_seconds": f"{report.load_seconds:.4f}", "weights_source": report.weights_source,
            "peak_rss_bytes": report.peak_rss_bytes,
            "weight_bytes_per_token": report.weight_bytes_per_token,
            "weight_bandwidth_gbs": "" if not t.n_gen else f"{report.weight_bytes_per_token * t.avg_ts / 1e9:.3f}",
            "mem_bandwidth_gbs": "" if report.mem_bandwidth_gbs is None else f"{report.mem_bandwidth_gbs:.3f}",
            "mem_bandwidth_threads_gbs": "" if report.mem_bandwidth_threads_gbs is None
            else f"{report.mem_bandwidth_threads_gbs:.3f}",
        })
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m ember.cli.bench`): the main CLI's `bench` command, its error handling included."""
    from ember.cli.main import main as ember_main

    return ember_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""`ember perplexity MODEL FILE`: llama-perplexity's measure (see ember.perplexity) on a text file."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ember.errors import ModelNotFoundError


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "perplexity",
        parents=list(parents),
        help="measure a model's perplexity on a text file (llama-perplexity's method)",
        description="Perplexity over non-overlapping chunks of --ctx tokens, scoring the second half of each "
        "chunk, exactly as llama.cpp's llama-perplexity does, so the numbers compare.",
    )
    p.add_argument("model", metavar="MODEL", help="model name or .gguf path")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    p.add_argument("--threads", type=int, default=None, metavar="N")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    import ember
    from ember.perplexity import perplexity

    path = Path(args.file)
    if not path.is_file():
        raise ModelNotFoundError(f"text file '{args.file}' not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    model = ember.load(args.model, n_ctx=max(args.ctx + 1, 8), threads=args.threads)
    t0 = time.perf_counter()
    r = perplexity(model, text, n_ctx=args.ctx)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": model.name, "file": str(path), "ctx": args.ctx, "perplexity": r.perplexity,
                          "nll": r.nll, "chunks": r.chunks, "scored_tokens": r.scored_tokens,
                          "tokens": r.tokens, "seconds": round(seconds, 3)}))
    else:
        print(f"{model.name}: perplexity {r.perplexity:.4f} over {r.chunks} chunks of {args.ctx} tokens "
              f"({r.scored_tokens} scored tokens) in {seconds:.1f} s", file=sys.stdout)
    return 0

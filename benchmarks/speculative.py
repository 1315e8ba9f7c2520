#!/usr/bin/env python3
"""Speculative decoding benchmark: decode speed with and without speculation, same model, same run.

    python3 benchmarks/speculative.py                       # all workloads below
    python3 benchmarks/speculative.py --workloads lookup    # just prompt lookup on SmolLM2

Workloads (batch 1, greedy, the model's other defaults - Ollama's repeat penalty 1.1 unless --repeat-penalty):
  lookup   SmolLM2-135M Q4_1, the first 1000 tokens of a document and "Summarize the following document.";
           prompt lookup (ngram) vs plain decoding. --documents picks them (default: all six):
           gpl3 (tests/fixtures/gpl3.txt), apache and mpl (license texts in benchmarks/documents/), and
           pydoc-json, pydoc-heapq, pydoc-textwrap (Python's own documentation of those modules, rendered by
           pydoc in this process). With several documents a row per document and a total row (all tokens over
           all time, per side).
  lowbit   SmolLM2 drafted by a Q2_K requantization of itself (`ember quantize ... Q2_K --allow-requantize`,
           cached under ~/.cache/ember/speculative).
  synth1b  the synthetic 1B Q4_K_M model (benchmarks/synthetic_models.py) drafted by a synthetic 4-layer
           model of the same vocabulary. Random weights: the draft agrees with the main model by chance only,
           so this measures what speculation costs when it does not pay (the back-off should bound it).
  deep     SmolLM2 deepened to 240 layers (benchmarks/synthetic_models.write_deepened: layers 30..239 are
           copies of its own whose outputs are scaled by 0.03) drafted by SmolLM2 itself: a stand-in for a
           larger model of the family that mostly agrees with its 135M sibling, at 8x the weight bytes per
           token - the case a draft model is for. Constructed, not trained: how often the two agree is
           measured (acceptance), but says nothing about real model pairs.
--analyze: no timing; for each document, the greedy summary (plain decoding) and what prompt lookup could do
with it: how often the token after the longest earlier match of the text's suffix is the next token, by
match length (the source of MatchAcceptance's prior), the speed-up bound of a proposer that knows which
copied tokens will be accepted (drafts exactly those), and the rate of one that drafts every match (up to
--draft-num-predict tokens, ungated), at --row-cost (a verification row's cost relative to a plain step; ~0.1
for SmolLM2 at 1000 tokens of context on the development machine).

For each: decode tokens/s (generated tokens / time from first token to last), mean and standard deviation
over --repeats alternating runs, the speed-up, acceptance rate, tokens emitted per verification step,
whether the greedy output was token-identical to plain decoding, and where copyable text came from: how much of
the output repeats itself (8-grams seen earlier in it: SmolLM2-135M's greedy summaries without a repeat penalty
often end in a loop, which prompt lookup predicts perfectly) and how much quotes the prompt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ember  # noqa: E402

CACHE = Path.home() / ".cache" / "ember" / "speculative"


DOCUMENTS = ("gpl3", "apache", "mpl", "pydoc-json", "pydoc-heapq", "pydoc-textwrap")


def document(name: str) -> str:
    if name == "gpl3":
        return (ROOT / "tests" / "fixtures" / "gpl3.txt").read_text()
    if name in ("apache", "mpl"):
        return (ROOT / "benchmarks" / "documents" / f"{name}-2.0.txt").read_text()
    if name.startswith("pydoc-"):
        import importlib
        import pydoc

        return pydoc.render_doc(importlib.import_module(name[len("pydoc-"):]), renderer=pydoc.plaintext)
    raise SystemExit(f"unknown document {name!r}; choose from {', '.join(DOCUMENTS)}")


def lookup_prompt(model: "ember.Model", n_tokens: int = 1000, doc: str = "gpl3") -> list[int]:
    text = document(doc)
    ids = model.tokenizer.encode(text, add_special=False)
    doc = model.tokenizer.decode(ids[:n_tokens])
    msgs = [{"role": "user", "content": "Summarize the following document.\n\n" + doc}]
    return model.prompt_ids(model.template.render(msgs, add_generation_prompt=True))


SAMPLING: dict = {"temperature": 0}  # greedy; --repeat-penalty adds to it


def run_once(model: "ember.Model", ids: list[int], max_tokens: int) -> dict:
    stream = model.engine.generate_stream(ids, model._options({**SAMPLING, "max_tokens": max_tokens}))
    for _ in stream:
        pass
    s = stream.result.stats
    return {"ids": stream.result.ids, "rate": s.generate_rate, "drafted": s.draft_tokens,
            "accepted": s.accepted_tokens, "steps": s.spec_steps, "generated": s.generated_tokens}


def repeated_fraction(out: list[int], source: list[int] | None = None, n: int = 8) -> float:
    """The fraction of out's n-grams that occurred before: earlier in out itself (source None: how much the text
    repeats itself, e.g. a summary stuck in a loop), or anywhere in source (how much it quotes the prompt)."""
    grams = len(out) - n + 1
    if grams < 1:
        return 0.0
    if source is not None:
        seen = {tuple(source[i:i + n]) for i in range(len(source) - n + 1)}
        return sum(tuple(out[i:i + n]) in seen for i in range(grams)) / grams
    earlier: set[tuple[int, ...]] = set()
    hits = 0
    for i in range(grams):
        g = tuple(out[i:i + n])
        hits += g in earlier
        earlier.add(g)
    return hits / grams


def compare(name: str, plain: "ember.Model", spec: "ember.Model", ids: list[int], max_tokens: int,
            repeats: int) -> dict:
    run_once(plain, ids, 8)  # warm-up both (first-call allocations)
    run_once(spec, ids, 8)
    base, fast = [], []
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        base.append(run_once(plain, ids, max_tokens))
        fast.append(run_once(spec, ids, max_tokens))
    b = [r["rate"] for r in base]
    f = [r["rate"] for r in fast]
    drafted = sum(r["drafted"] for r in fast)
    accepted = sum(r["accepted"] for r in fast)
    steps = sum(r["steps"] for r in fast)
    return {
        "workload": name,
        "plain_seconds": sum(r["generated"] / r["rate"] for r in base),
        "spec_seconds": sum(r["generated"] / r["rate"] for r in fast),
        "tokens": sum(r["generated"] for r in base),
        "drafted": drafted, "accepted": accepted, "steps": steps,
        "prompt_tokens": len(ids),
        "generated": fast[-1]["generated"],
        "plain_tps": statistics.mean(b), "plain_sd": statistics.pstdev(b),
        "spec_tps": statistics.mean(f), "spec_sd": statistics.pstdev(f),
        "speedup": statistics.mean(f) / statistics.mean(b),
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_step": (accepted + steps) / steps if steps else 0.0,
        "identical": all(x["ids"] == y["ids"] for x, y in zip(base, fast)),
        # where the accepted drafts come from: the output repeating itself, or quoting the prompt
        "self_repeat": repeated_fraction(base[-1]["ids"]),
        "quotes_prompt": repeated_fraction(base[-1]["ids"], ids),
    }


def replay(ids: list[int], out: list[int], row_cost: float, k: int | None) -> tuple[float, float]:
    """Replay a greedy output through prompt lookup (latest longest match, as NgramIndex proposes): k None
    drafts exactly the copied tokens that will be accepted (foresight), else up to k copied tokens at every
    match. Returns (tokens a step, speed-up over plain decoding at `row_cost` per verification row)."""
    from ember.engine.speculative import NgramIndex

    idx = NgramIndex(1, 12)
    idx.extend(ids)
    i = steps = 0
    cost = 0.0
    while i < len(out):
        limit = len(out) - i - 1  # the last token always comes from verification
        cand, _ = idx.match(limit if k is None else min(k, limit))
        acc = next((j for j, (a, b) in enumerate(zip(cand, out[i:])) if a != b), min(len(cand), limit))
        cost += 1.0 + row_cost * (acc if k is None else len(cand))
        steps += 1
        idx.extend(out[i:i + acc + 1])
        i += acc + 1
    return len(out) / steps, len(out) / cost


def analyze(docs: list[str], tokens: int, row_cost: float, k: int) -> None:
    """Match-length statistics, and the foresight bound and the draft-every-match rate of prompt lookup on
    each document's greedy summary."""
    from ember.engine.speculative import NgramIndex

    m = ember.load("smollm2")
    seen: dict[int, list[int]] = {}  # match length (12 = 12+) -> [proposals, right]
    print(f"| document | greedy tokens | foresight tokens/step | foresight bound | every match (k = {k}) "
          f"tokens/step | every match speed-up |  (row cost {row_cost})")
    print("|---|---|---|---|---|---|")
    for doc in docs:
        ids = lookup_prompt(m, doc=doc)
        out = run_once(m, ids, tokens)["ids"]
        idx = NgramIndex(1, 12)
        idx.extend(ids)
        for t in out:  # one-step hit rate by match length
            cand, n = idx.match(1)
            if cand:
                st = seen.setdefault(n, [0, 0])
                st[0] += 1
                st[1] += cand[0] == t
            idx.extend([t])
        fs, fb = replay(ids, out, row_cost, None)
        es, eb = replay(ids, out, row_cost, k)
        print(f"| {doc} | {len(out)} | {fs:.2f} | {fb:.2f}x | {es:.2f} | {eb:.2f}x |")
    print("\n| match length | proposals | next token right |")
    print("|---|---|---|")
    for n in sorted(seen):
        print(f"| {n}{'+' if n == 12 else ''} | {seen[n][0]} | {seen[n][1] / seen[n][0]:.2f} |")
    m.close()


def lowbit_draft() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / "smollm2-q2_k.gguf"
    if not out.exists():
        src = ember.load("smollm2").path
        subprocess.run([sys.executable, "-m", "ember.cli.main", "quantize", "--allow-requantize", str(src),
                        str(out), "Q2_K"], check=True, stdout=subprocess.DEVNULL)
    return out


DEEP_LAYERS, DEEP_EPS = 240, 0.03


def deep_pair() -> tuple[Path, Path]:
    """SmolLM2 deepened to DEEP_LAYERS layers (synthetic_models.write_deepened: the copies' outputs scaled by
    DEEP_EPS) as the main model, SmolLM2 itself as its draft."""
    from synthetic_models import write_deepened

    draft = Path(ember.load("smollm2").path)
    main = CACHE / f"smollm2-deep{DEEP_LAYERS}-eps{DEEP_EPS}.gguf"
    if not main.exists():
        write_deepened(draft, main, DEEP_LAYERS, DEEP_EPS)
    return main, draft


def synthetic_pair() -> tuple[Path, Path]:
    from synthetic_models import Shape, synthetic_model, write_synthetic

    main = synthetic_model("1b", "q4_k_m")
    draft = CACHE / "synthetic-llama-draft-q4_k_m.gguf"
    if not draft.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        write_synthetic(draft, Shape(n_layer=4, n_embd=512, n_ff=1536, n_head=8, n_head_kv=4), "q4_k_m", seed=1,
                        name="synthetic-llama-draft")
    return main, draft


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["lookup", "lowbit", "synth1b", "deep"],
                    choices=["lookup", "lowbit", "synth1b", "deep"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--documents", nargs="+", default=["all"], help=f"lookup documents: {', '.join(DOCUMENTS)} or all")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate per run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--analyze", action="store_true", help="match statistics and the foresight bound, no timing")
    ap.add_argument("--row-cost", type=float, default=0.1, help="--analyze: a verification row / a plain step")
    ap.add_argument("--draft-num-predict", type=int, default=None,
                    help="most tokens drafted a step (the per-request option; default: the engine's, "
                         "DEFAULT_DRAFT_TOKENS)")
    ap.add_argument("--repeat-penalty", type=float, default=None,
                    help="override the repeat penalty (default: the model's, Ollama's 1.1; 1.0 is llama.cpp's and "
                         "OpenAI's default sampler)")
    args = ap.parse_args(argv)
    if args.repeat_penalty is not None:
        SAMPLING["repeat_penalty"] = args.repeat_penalty
    if args.draft_num_predict is not None:
        SAMPLING["draft_num_predict"] = args.draft_num_predict
    results = []
    t0 = time.time()
    docs = list(DOCUMENTS) if args.documents == ["all"] else args.documents
    if args.analyze:
        from ember.engine.speculative import DEFAULT_DRAFT_TOKENS

        analyze(docs, args.tokens, args.row_cost, args.draft_num_predict or DEFAULT_DRAFT_TOKENS)
        return 0
    for w in args.workloads:
        if w == "lookup":
            plain, spec = ember.load("smollm2"), ember.load("smollm2", speculative="ngram")
            for doc in docs:
                r = compare(f"lookup {doc}", plain, spec, lookup_prompt(plain, doc=doc), args.tokens, args.repeats)
                results.append(r)
            if len(docs) > 1:
                part = results[-len(docs):]
                total = {k: sum(r[k] for r in part) for k in ("plain_seconds", "spec_seconds", "tokens", "drafted",
                                                              "accepted", "steps")}
                results.append({
                    "workload": "lookup, all documents", "prompt_tokens": "-", "generated": "-",
                    "plain_tps": total["tokens"] / total["plain_seconds"], "plain_sd": 0.0,
                    "spec_tps": total["tokens"] / total["spec_seconds"], "spec_sd": 0.0,
                    "speedup": total["plain_seconds"] / total["spec_seconds"],
                    "acceptance": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                    "tokens_per_step": (total["accepted"] + total["steps"]) / total["steps"] if total["steps"] else 0,
                    "identical": all(r["identical"] for r in part), **total})
            plain.close()
            spec.close()
            continue
        if w == "lowbit":
            plain, spec = ember.load("smollm2"), ember.load("smollm2", draft=lowbit_draft())
            ids = lookup_prompt(plain, 200)
        elif w == "deep":
            main_path, draft_path = deep_pair()
            plain, spec = ember.load(main_path), ember.load(main_path, draft=draft_path)
            ids = lookup_prompt(plain, 200)
        else:
            main_path, draft_path = synthetic_pair()
            plain, spec = ember.load(main_path), ember.load(main_path, draft=draft_path)
            ids = [1] + list(range(100, 300))
        results.append(compare(w, plain, spec, ids, args.tokens, args.repeats))
        plain.close()
        spec.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| workload | prompt | plain t/s | speculative t/s | speed-up | acceptance | tokens/step | identical | "
          "self-repeat | quotes prompt |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        reps = "-" if "self_repeat" not in r else f"{100 * r['self_repeat']:.0f}%"
        quotes = "-" if "quotes_prompt" not in r else f"{100 * r['quotes_prompt']:.0f}%"
        print(f"| {r['workload']} | {r['prompt_tokens']} | {r['plain_tps']:.1f} ± {r['plain_sd']:.1f} | "
              f"{r['spec_tps']:.1f} ± {r['spec_sd']:.1f} | {r['speedup']:.2f}x | {100 * r['acceptance']:.1f}% | "
              f"{r['tokens_per_step']:.2f} | {'yes' if r['identical'] else 'NO'} | {reps} | {quotes} |")
    print("(self-repeat: the share of the greedy output's 8-grams that occurred earlier in the output - a summary "
          "stuck in a loop is near 100%; quotes prompt: the share that occur in the prompt)")
    print(f"({time.time() - t0:.0f} s)")
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

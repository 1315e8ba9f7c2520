"""Aggregate throughput of Ember's serving engine with N concurrent requests, beside llama-batched-bench.

    python3 benchmarks/engine_throughput.py --models smollm2 gemma3 --npl 1 4 16 64

For each N: N requests of --npp random prompt tokens and exactly --ntg generated tokens (greedy, EOG tokens
banned so every request generates the full count) are added at once; the engine steps until all finish.
Reported like llama-batched-bench: prompt time / rate, generation time / rate (decode tokens per second of
the steps after every prompt is in), total. llama.cpp's side runs its own llama-batched-bench with the same
settings (built by benchmarks/llamacpp_tools.sh); it is skipped with a note when the binary is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

# The environment as the user gave it, captured before anything imports ember: ember sets
# OMP_WAIT_POLICY=PASSIVE for itself, and llama.cpp inheriting that runs ~3x slower (measured tg128 51 vs
# 150 t/s), which would flatter Ember.
ORIGINAL_ENV = dict(os.environ)
from pathlib import Path

LLAMA_BIN = Path(os.environ.get("EMBER_LLAMACPP_BIN", Path.home() / ".cache/ember/llamacpp/bin"))


def ember_run(model_name: str, n: int, npp: int, ntg: int, threads: int) -> dict:
    import ember
    from ember.engine.engine import Engine, EngineConfig
    from ember.engine.generator import GenerationOptions
    from ember.engine.sampler import SamplingParams

    m = ember.load(model_name, n_ctx=npp + ntg + 8, threads=threads)
    c = m.config
    kv_per_token = c.n_layer * c.n_head_kv * (c.head_dim + c.value_dim) * 2
    engine = Engine(m.model, m.tokenizer, EngineConfig(
        max_model_len=npp + ntg + 8, max_num_seqs=max(n, 1),
        kv_cache_bytes=int(1.1 * n * (npp + ntg + 16) * kv_per_token)))
    ban = {t: -1e9 for t in m.tokenizer.eog_ids}
    opts = GenerationOptions(max_tokens=ntg, sampling=SamplingParams(temperature=0, logit_bias=ban))
    rng = random.Random(0)
    vocab = c.n_vocab
    t0 = time.perf_counter()
    for _ in range(n):
        engine.add_request([rng.randrange(10, vocab) for _ in range(npp)], opts)
    first_gen = None
    generated = 0
    while engine.has_work():
        outs = engine.step()
        produced = sum(1 for o in outs if o.token is not None)
        if first_gen is None and engine.stats().num_waiting == 0 and all(
                s.num_computed_tokens >= len(s.prompt_token_ids) for s in engine.scheduler.running):
            first_gen = time.perf_counter()
            generated = 0
        generated += produced
    t1 = time.perf_counter()
    first_gen = first_gen or t1
    return {"engine": "ember", "N": n, "npp": npp, "ntg": ntg,
            "T_pp_s": first_gen - t0, "S_pp_tps": n * npp / max(first_gen - t0, 1e-9),
            "T_tg_s": t1 - first_gen, "S_tg_tps": generated / max(t1 - first_gen, 1e-9),
            "T_s": t1 - t0, "S_tps": n * (npp + ntg) / (t1 - t0)}


def llamacpp_run(path: str, npl: list[int], npp: int, ntg: int, threads: int) -> list[dict]:
    exe = LLAMA_BIN / "llama-batched-bench"
    if not exe.exists():
        print(f"llama-batched-bench not found at {exe}: run benchmarks/llamacpp_tools.sh", file=sys.stderr)
        return []
    ctx = max(npl) * (npp + ntg) + 64
    cmd = [str(exe), "-m", path, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(npp), "-ntg", str(ntg),
           "-npl", ",".join(map(str, npl)), "-t", str(threads), "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=ORIGINAL_ENV)
    rows = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append({"engine": "llama.cpp", "N": r.get("pl"), "npp": npp, "ntg": ntg,
                         "T_pp_s": r.get("t_pp"), "S_pp_tps": r.get("speed_pp"), "T_tg_s": r.get("t_tg"),
                         "S_tg_tps": r.get("speed_tg"), "T_s": r.get("t"), "S_tps": r.get("speed")})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"])
    ap.add_argument("--npl", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--ntg", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    from ember.store import resolve_model

    results = []
    for name in args.models:
        path = str(resolve_model(name).path)
        lrows = {} if args.skip_llamacpp else {r["N"]: r for r in llamacpp_run(path, args.npl, args.npp, args.ntg,
                                                                              args.threads)}
        print(f"\n{name}: npp {args.npp}, ntg {args.ntg}, threads {args.threads}")
        print("| N | llama.cpp S_TG t/s | Ember S_TG t/s | TG E/L | llama.cpp total t/s | Ember total t/s |")
        print("|---|---|---|---|---|---|")
        for n in args.npl:
            e = ember_run(name, n, args.npp, args.ntg, args.threads)
            l = lrows.get(n)
            ratio = f"{e['S_tg_tps'] / l['S_tg_tps']:.2f}" if l and l["S_tg_tps"] else "-"
            print(f"| {n} | {l['S_tg_tps'] if l else '-'} | {e['S_tg_tps']:.1f} | {ratio} | "
                  f"{l['S_tps'] if l else '-'} | {e['S_tps']:.1f} |", flush=True)
            results.append({"model": name, "ember": e, "llamacpp": l})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

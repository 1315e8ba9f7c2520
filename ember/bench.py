"""Single-stream speed measurement, modelled on llama.cpp's llama-bench.

Two tests, each repeated and reported as mean ± std tokens/s:
- ppN: one prompt of N random token ids from an empty cache, run in the engine's 512-token chunks.
- tgM: M single-token decode steps after an (untimed) one-token prefill, i.e. generation from an almost empty
  context, as llama-bench's tg test measures it.

Both drive `Transformer.forward` over the engine's paged KV cache with a per-step batch layout, as the
engine's runner does for one sequence (what `ember run` and the server execute), so the scheduler, tokenizer,
sampler and text streaming stay out of the numbers, as llama-bench leaves out llama.cpp's sampling. Alongside speed we report load time, peak RSS and, for generation,
the effective weight bandwidth (bytes of weights read per token x tokens/s) next to this machine's measured
memory bandwidth: decode is memory-bound, so that ratio says how far we are from the hardware limit.
"""
from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ember.engine.generator import PREFILL_CHUNK
from ember.engine.paged_cache import BatchLayout, PagedKVCache
from ember.model.transformer import Transformer, weight_bytes_per_token


@dataclass(frozen=True)
class BenchConfig:
    model: str
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    threads: int | None = None  # None: ember's default (the cores this process may use)
    n_ctx: int | None = None  # None: just enough for the larger test
    warmup: bool = True  # one untimed run of each test first, as llama-bench does
    bandwidth_bytes: int = 1 << 30  # size of the memory-bandwidth probe; 0 skips it
    seed: int = 0
    speculative: str | None = None  # "ngram" | "draft": add sg tests (engine generation, plain vs speculative)
    draft: str | None = None  # draft model for speculative "draft"


@dataclass
class TestResult:
    name: str  # "pp512" / "tg128", llama-bench's naming
    n_prompt: int
    n_gen: int
    samples_s: list[float] = field(default_factory=list)  # wall seconds of each repetition
    drafted: int = 0  # speculative tests: draft tokens proposed, accepted, verification steps
    accepted: int = 0
    spec_steps: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        return (self.accepted + self.spec_steps) / self.spec_steps if self.spec_steps else None

    @property
    def n_tokens(self) -> int:
        return self.n_prompt if self.n_gen == 0 else self.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens / s for s in self.samples_s]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        ts = self.samples_ts
        return statistics.stdev(ts) if len(ts) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "samples_s": self.samples_s,
            "samples_ts": self.samples_ts,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            "acceptance": self.acceptance,
            "tokens_per_step": self.tokens_per_step,
        }


@dataclass
class BenchReport:
    model: str
    path: str
    architecture: str
    quantization: str
    parameters: int
    file_size: int
    threads: int
    n_ctx: int
    load_seconds: float
    weights_source: str  # "repacked" (GGUF blocks converted at load) or "pack cache" (mapped from disk)
    peak_rss_bytes: int  # high-water mark of this process after the tests (VmHWM, else ru_maxrss)
    weight_bytes_per_token: int  # resident repacked Linear weights + one embedding row
    mem_bandwidth_gbs: float | None  # machine read bandwidth, one thread
    mem_bandwidth_threads_gbs: float | None  # the same probe with the benchmark's thread count
    tests: list[TestResult]
    torch_version: str = torch.__version__
    cpu: str = field(default_factory=lambda: _cpu_name())

    def test(self, prefix: str) -> TestResult | None:
        return next((t for t in self.tests if t.name.startswith(prefix)), None)

    @property
    def tg_bandwidth_gbs(self) -> float | None:
        """Effective weight bandwidth of generation: bytes of weights read per token x tokens/s."""
        tg = self.test("tg")
        return self.weight_bytes_per_token * tg.avg_ts / 1e9 if tg else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tests"] = [t.to_dict() for t in self.tests]
        d["tg_bandwidth_gbs"] = self.tg_bandwidth_gbs
        return d


# -- machine facts -----------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process. VmHWM is exact on Linux; ru_maxrss is KiB on Linux and bytes
    on macOS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if platform.system() == "Darwin" else maxrss * 1024


def measure_memory_bandwidth(n_bytes: int = 1 << 30, threads: int = 1, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: best of `repeats` sums over an n_bytes float32 array (far larger than any
    cache, so every pass streams from DRAM). A sum is the access pattern of a decode step's weight reads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(max(n_bytes // 4, 1), dtype=torch.float32)  # ones(): pages are touched before timing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- the tests ---------------------------------------------------------------------------------------------

def _random_ids(rng: np.random.Generator, n: int, n_vocab: int) -> list[int]:
    return rng.integers(0, n_vocab, size=n).tolist()


class PagedRun:
    """One sequence on a paged KV cache laid out as the engine's runner lays it out (its block size and KV
    dtype, a block table, a BatchLayout per step), so pp/tg time the attention path users run, not the
    contiguous reference cache. The table is blocks 0..n-1 in order, as a fresh engine hands them out."""

    def __init__(self, model: Transformer, n_ctx: int, block_size: int = 16, kv_dtype: str = "float16"):
        c = model.config
        n_blocks = -(-n_ctx // block_size)
        self.model = model
        self.cache = PagedKVCache(c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, n_blocks, block_size, kv_dtype)
        self.table = list(range(n_blocks))

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Positions [start, start + len(ids)) -> logits of the last one (as a sampling entry gets them)."""
        n = len(ids)
        self.cache.set_batch(BatchLayout.build(self.cache.block_size, [(self.table, start, n)], self.cache.exact))
        return self.model.forward(torch.tensor(ids, dtype=torch.long), torch.arange(start, start + n),
                                  self.cache,  # type: ignore[arg-type]  # duck-typed like KVCache
                                  logit_rows=torch.tensor([n - 1]))


def run_prompt(model: Transformer, ids: list[int], n_ctx: int, block_size: int = 16, kv_dtype: str = "float16") -> float:
    """Seconds to prefill `ids` into a fresh paged cache in the engine's chunks (last-position logits only)."""
    run = PagedRun(model, n_ctx, block_size, kv_dtype)
    t0 = time.perf_counter()
    for start in range(0, len(ids), PREFILL_CHUNK):
        run.forward(ids[start : start + PREFILL_CHUNK], start)
    return time.perf_counter() - t0


def run_generation(model: Transformer, ids: list[int], n_ctx: int, block_size: int = 16,
                   kv_dtype: str = "float16") -> float:
    """Seconds for len(ids)-1 single-token steps after a one-token prefill (untimed) into a fresh paged cache."""
    run = PagedRun(model, n_ctx, block_size, kv_dtype)
    run.forward(ids[:1], 0)
    t0 = time.perf_counter()
    for pos in range(1, len(ids)):
        run.forward(ids[pos : pos + 1], pos)
    return time.perf_counter() - t0


def copyable_prompt(rng: np.random.Generator, n: int, n_vocab: int, period: int = 64) -> list[int]:
    """n ids repeating one random block of `period`: context a model continues by copying, the situation
    prompt lookup and draft models are for (summaries, code edits). A best case for speculation, by design."""
    block = _random_ids(rng, period, n_vocab)
    return (block * (n // period + 1))[:n]


def run_engine_generation(m: Any, ids: list[int], n_gen: int, draft_num_predict: int, result: TestResult) -> float:
    """Seconds to generate n_gen tokens greedily through the model's engine (first token to last), with
    speculation limited to draft_num_predict tokens per step (0: none). Adds the draft counters to result."""
    from ember.engine.generator import GenerationOptions
    from ember.engine.sampler import SamplingParams

    ban = {int(t): float("-inf") for t in m.tokenizer.eog_ids}  # generate exactly n_gen tokens
    opts = GenerationOptions(max_tokens=n_gen, draft_num_predict=draft_num_predict,
                             sampling=SamplingParams(temperature=0, repeat_penalty=1.0, logit_bias=ban))
    stream = m.engine.generate_stream(ids, opts)
    for _ in stream:
        pass
    st = stream.result.stats
    result.drafted += st.draft_tokens
    result.accepted += st.accepted_tokens
    result.spec_steps += st.spec_steps
    return st.generate_seconds * n_gen / max(1, st.generated_tokens - 1)


def _repeat(result: TestResult, once: Callable[[], float], reps: int, warmup: bool) -> TestResult:
    if warmup:
        once()  # first-touch page faults of mmapped weights and torch's kernel selection, as llama-bench
    for _ in range(reps):
        result.samples_s.append(once())
    return result


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> BenchReport:
    """Load the model, run ppN and tgM, then probe memory bandwidth (last, so its buffer is not in the
    peak RSS reported for the model)."""
    import ember  # the public API; imported here so `import ember.bench` stays cheap

    if cfg.n_prompt < 0 or cfg.n_gen < 0 or cfg.repetitions < 1:
        raise ValueError("n_prompt and n_gen must be >= 0 and repetitions >= 1")
    say = log or (lambda _msg: None)
    n_ctx = cfg.n_ctx or max(cfg.n_prompt, cfg.n_gen + 1, 8)
    if cfg.speculative:
        n_ctx = max(n_ctx, max(cfg.n_prompt, 128) + cfg.n_gen + 64)  # the sg prompt is >= 128 tokens
    m = ember.load(cfg.model, n_ctx=n_ctx, threads=cfg.threads, speculative=cfg.speculative, draft=cfg.draft)
    try:
        model = m.model
        layout = (m.engine.config.block_size, m.engine.config.kv_dtype)
        n_vocab = model.config.n_vocab
        rng = np.random.default_rng(cfg.seed)
        tests: list[TestResult] = []
        if cfg.n_prompt > 0:
            say(f"pp{cfg.n_prompt}: {cfg.repetitions} runs")
            ids = _random_ids(rng, cfg.n_prompt, n_vocab)
            tests.append(
                _repeat(TestResult(f"pp{cfg.n_prompt}", cfg.n_prompt, 0),
                        lambda: run_prompt(model, ids, n_ctx, *layout), cfg.repetitions, cfg.warmup)
            )
        if cfg.n_gen > 0:
            say(f"tg{cfg.n_gen}: {cfg.repetitions} runs")
            ids = _random_ids(rng, cfg.n_gen + 1, n_vocab)
            tests.append(
                _repeat(TestResult(f"tg{cfg.n_gen}", 0, cfg.n_gen),
                        lambda: run_generation(model, ids, n_ctx, *layout), cfg.repetitions, cfg.warmup)
            )
        if cfg.speculative and cfg.n_gen > 0:
            ids = copyable_prompt(rng, max(cfg.n_prompt, 128), n_vocab)
            for label, k in (("plain", 0), (cfg.speculative, None)):
                say(f"sg{cfg.n_gen} ({label}): {cfg.repetitions} runs")
                result = TestResult(f"sg{cfg.n_gen} {label}", 0, cfg.n_gen)
                draft_k = 0 if k == 0 else m.engine.config.speculative.num_tokens
                _repeat(result, lambda: run_engine_generation(m, ids, cfg.n_gen, draft_k, result),
                        cfg.repetitions, cfg.warmup)
                tests.append(result)
        info = m.info()
        threads = torch.get_num_threads()
        rss = peak_rss_bytes()
        weights_source = model.weights_source
        wbytes = weight_bytes_per_token(model)
    finally:
        m.close()
    bw1 = bwn = None
    if cfg.bandwidth_bytes > 0:
        say("memory bandwidth probe")
        bw1 = measure_memory_bandwidth(cfg.bandwidth_bytes, threads=1)
        bwn = bw1 if threads == 1 else measure_memory_bandwidth(cfg.bandwidth_bytes, threads=threads)
    return BenchReport(
        model=m.name,
        path=str(m.path),
        architecture=m.architecture,
        quantization=str(info["quantization"]),
        parameters=int(info["parameters"]),
        file_size=int(info["file_size"]),
        threads=threads,
        n_ctx=n_ctx,
        load_seconds=m.load_seconds,
        weights_source=weights_source,
        peak_rss_bytes=rss,
        weight_bytes_per_token=wbytes,
        mem_bandwidth_gbs=bw1,
        mem_bandwidth_threads_gbs=bwn,
        tests=tests,
    )


__all__ = [
    "BenchConfig",
    "BenchReport",
    "TestResult",
    "measure_memory_bandwidth",
    "peak_rss_bytes",
    "run_bench",
    "run_generation",
    "run_prompt",
]

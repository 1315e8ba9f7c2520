"""The serving engine: many concurrent requests over one model, continuous batching on a paged KV cache.

    engine = Engine(model, tokenizer, EngineConfig())
    rid = engine.add_request(prompt_ids, GenerationOptions(max_tokens=64))
    while engine.has_work():
        for out in engine.step(): ...                 # RequestOutput: token, text delta, finished, reason

    for chunk in engine.generate_stream(ids, opts): ...   # one request as a TokenStream (the Generator API)

    engine.start_background()                         # a thread runs step() while there is work
    handle = engine.submit(ids, opts)                 # thread-safe queue of that request's outputs
    async for out in engine.stream(ids, opts): ...    # asyncio: outputs as they come (abort on cancel)

One step = scheduler.step() (what runs) -> Runner.execute (one forward pass, mixed prefill chunks and decodes)
-> per-request sampling -> detokenize + stop strings -> scheduler.update(). Each request owns its Sampler
(seeded from its own options) and draws exactly one number per sampled token, and decode attention is
bit-identical to running alone (PagedKVCache exact mode), so a request's tokens do not depend on what else runs
beside it - up to two last-bit effects outside this module: where the token budget cuts a long prompt into
chunks (SDPA sums in key-length-dependent order), and torch's bfloat16 GEMV (1 row) vs GEMM (several rows),
which differ now and then for dense weights with long rows (seen on gemma3's Q6_K/Q8_0 matrices).

Threads: every engine method may be called from any thread. step() holds `_lock` for a whole pass;
add_request() never waits for it (requests go through an inbox that step() drains), and abort() frees the
request's blocks at once when no step is running, else the running step's end applies it.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence as SequenceT

import torch

from ember.engine.draft import DraftProposer
from ember.engine.generator import Chunk, Completion, GenerationOptions, TokenStream
from ember.engine.kv_budget import plan_kv_pools
from ember.engine.outputs import EngineStats, RequestMetrics, RequestOutput
from ember.engine.paged_cache import KV_DTYPES, PagedKVCache
from ember.engine.runner import Runner
from ember.engine.sampler import BatchParams, Sampler, greedy, penalty_windows, sample_batch, top_logprobs
from ember.engine.speculative import SpeculativeConfig
from ember.engine.speculator import RequestSpeculation, Speculator
from ember.engine.scheduler import ScheduledBatch, ScheduledSeq, Scheduler, SchedulerConfig
from ember.engine.sequence import FinishReason, Sequence
from ember.engine.stop import StopMatcher
from ember.errors import ContextOverflowError, InvalidParameterError
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: as many as kv_cache_bytes holds (global group: see kv_budget)
    # Blocks of the sliding-window group (models mixing windowed and global layers; ignored by others).
    # None: kv_budget's sizing rule.
    window_num_blocks: Optional[int] = None
    window_group: bool = True  # False: one KV group, windowed layers keep every block (the old layout)
    kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # per step; also the largest prefill chunk
    kv_dtype: str = "float16"  # "float16" | "bfloat16" | "q8_0"
    max_model_len: Optional[int] = None  # None: the model's rope table length (its n_ctx)
    enable_prefix_caching: bool = True
    exact_attention: bool = True  # batch-invariant decode attention (see PagedKVCache)
    speculative: SpeculativeConfig = SpeculativeConfig()  # default: no speculation

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidParameterError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1:
            raise InvalidParameterError(f"kv_cache_bytes must be a positive integer, got {self.kv_cache_bytes!r}")
        w = self.window_num_blocks
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise InvalidParameterError(f"window_num_blocks must be a positive integer or None, got {w!r}")
        # block_size, num_blocks, max_num_seqs, max_num_batched_tokens are validated by SchedulerConfig.


Sink = Callable[[RequestOutput], None]


class _Request:
    """Engine-side state of one request: its sequence plus everything that turns tokens into text."""

    def __init__(self, seq: Sequence, options: GenerationOptions, sampler: Sampler, tokenizer: Tokenizer,
                 sink: Optional[Sink]):
        self.seq = seq
        self.options = options
        self.sampler = sampler
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopMatcher(options.stop)
        self.sink = sink
        self.out_ids: list[int] = []
        self.text: list[str] = []
        self.cached_tokens: Optional[int] = None
        self.empty = False  # max_tokens == 0: finishes ("length") without running
        self.logprobs: Optional[int] = None  # top alternatives to report per token; None: no logprobs
        self.constraint = options.constraint() if options.constraint is not None else None
        self.spec: Optional[RequestSpeculation] = None  # set by the engine when this request speculates


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 draft_model: Optional[Transformer] = None):
        c = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        n_pos = _rope_positions(model)
        self.max_model_len = min(config.max_model_len or n_pos, n_pos)
        # KV groups: gemma3's sliding-window layers get their own, smaller pool whose blocks are given back as
        # the window moves; other models keep one pool (see kv_budget for the sizing rule).
        plan = functools.partial(
            plan_kv_pools, [c.sliding_window if c.is_swa(i) else 0 for i in range(c.n_layer)], c.n_head_kv,
            c.head_dim, c.value_dim, block_size=config.block_size, dtype=config.kv_dtype,
            kv_cache_bytes=config.kv_cache_bytes, num_blocks=config.num_blocks, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            window_num_blocks=config.window_num_blocks,
        )
        pools = plan(window_group=config.window_group)
        num_blocks = pools.num_blocks[0]
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_prefix_caching=config.enable_prefix_caching,
                max_model_len=self.max_model_len,
                sliding_window=pools.window,
                window_num_blocks=pools.window_num_blocks,
            )
        )
        self.cache = PagedKVCache(
            c.n_layer, c.n_head_kv, c.head_dim, c.value_dim, pools.num_blocks, config.block_size, config.kv_dtype,
            exact=config.exact_attention, layer_groups=pools.layer_groups,
        )
        self.runner = Runner(model, self.cache)
        spec = config.speculative
        if spec.method == "draft" and draft_model is None:
            raise InvalidParameterError("speculative method 'draft' needs a draft model")
        self.draft: Optional[DraftProposer] = None
        if draft_model is not None:
            # One group of as many blocks as the one-group layout would give the main model: window groups let the
            # main model hold more tokens, but the draft's pool keeps its size (it drops what it cannot hold).
            draft_blocks = plan(window_group=False).num_blocks[0]
            self.draft = DraftProposer(draft_model, c.n_vocab, draft_blocks, config.block_size, config.kv_dtype)
        self.speculator = Speculator(spec, c.n_vocab, self.draft,
                                     self.draft.cost_prior(model) if self.draft is not None else None)
        self._eog = frozenset(tokenizer.eog_ids)
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()  # held by step() for a whole pass, and by anything touching scheduler
        self._wake = threading.Condition()  # guards _inbox/_pending; signals the background loop
        self._inbox: deque[tuple[str, object]] = deque()
        self._pending: list[RequestOutput] = []  # produced outside step() (immediate aborts), returned next
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.num_steps = 0
        self.num_preemptions = 0

    # --- requests ----------------------------------------------------------------------------------------

    def add_request(self, prompt_ids: SequenceT[int], options: GenerationOptions = GenerationOptions(),
                    sink: Optional[Sink] = None, logprobs: Optional[int] = None) -> int:
        """Queue a request; returns its id. `sink`, if given, is called (from the thread running step()) with
        each of its outputs, in order. `logprobs` (n >= 0) adds each token's logprob and its n most likely
        alternatives to the outputs. Raises InvalidParameterError / ContextOverflowError at once."""
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise InvalidParameterError(f"logprobs must be a non-negative integer, got {logprobs!r}")
        ids = [int(t) for t in prompt_ids]
        n_vocab = self.model.config.n_vocab
        if not ids:
            raise InvalidParameterError("the prompt is empty")
        if any(not 0 <= t < n_vocab for t in ids):
            raise InvalidParameterError(f"prompt token ids must be in 0..{n_vocab - 1}")
        if len(ids) >= self.max_model_len:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens does not fit the context window of {self.max_model_len} tokens"
            )
        # As the single-sequence path: generate until max_tokens or the context is full, whichever first.
        room = self.max_model_len - len(ids)
        max_tokens = room if options.max_tokens is None else min(options.max_tokens, room)
        sampler = Sampler(options.sampling, n_vocab)  # validates logit_bias against the vocabulary
        rid = next(self._ids)
        # A seeded request computes its whole prompt, as a fresh one would: bfloat16 results depend on the
        # batch shape that computed them, and the same seed must give the same tokens.
        seq = Sequence(rid, ids, max(1, max_tokens), use_prefix_cache=options.sampling.seed is None)
        req = _Request(seq, options, sampler, self.tokenizer, sink)
        req.empty = max_tokens == 0
        req.logprobs = logprobs
        req.spec = self.speculator.for_request(options.draft_num_predict, req.constraint is not None)
        if not req.empty:
            self.scheduler.check_fits(len(ids), max_tokens)  # fail now, in the caller's thread
        with self._wake:
            self._inbox.append(("add", req))
            self._wake.notify_all()
        return rid

    def abort(self, request_id: int) -> None:
        """Cancel a request. Its blocks are freed at once if no step is running, else when it ends; its last
        output has finish_reason "abort". Unknown or finished ids are ignored."""
        with self._wake:
            self._inbox.append(("abort", request_id))
            self._wake.notify_all()
        if self._lock.acquire(blocking=False):
            try:
                outputs = self._drain()
            finally:
                self._lock.release()
            with self._wake:
                self._pending.extend(outputs)
                self._wake.notify_all()

    def has_work(self) -> bool:
        with self._wake:
            if self._inbox or self._pending:
                return True
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        with self._lock:
            s = self.scheduler
            b = s.kv.stats()  # summed over KV groups
            return EngineStats(
                num_running=len(s.running), num_waiting=len(s.waiting), num_steps=self.num_steps,
                num_preemptions=self.num_preemptions, num_free_blocks=s.kv.num_free_blocks,
                num_blocks=b.num_blocks, prefix_hit_tokens=b.prefix_hit_tokens,
                prefix_query_tokens=b.prefix_query_tokens,
                spec_drafted=self.speculator.drafted, spec_accepted=self.speculator.accepted,
                spec_steps=self.speculator.steps, spec_emitted=self.speculator.emitted,
            )

    # --- the step ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass over what the scheduler picks; return every request's outputs of this step
        (plus those of aborts since the last step). Outputs also go to their request's sink."""
        with self._lock:
            with self._wake:
                outputs, self._pending = self._pending, []
            outputs += self._drain()
            if not self.scheduler.has_unfinished():
                return outputs
            if self.speculator.config.enabled:  # no per-step speculation work when it is off (the default)
                self.speculator.propose(self.scheduler.running, {
                    sid: (r.spec, r.sampler) for sid, r in self._requests.items() if r.spec is not None})
            batch = self.scheduler.step()
            try:
                outputs += self._run(batch)
            except BaseException as exc:
                outputs += self._fail_batch(batch, exc)
                if not isinstance(exc, Exception):
                    raise
        return outputs

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        self.num_steps += 1
        self.num_preemptions += len(batch.preempted)
        for e in batch.scheduled:
            req = self._requests[e.seq.seq_id]
            if req.cached_tokens is None:  # first admission: what the prefix cache credited
                req.cached_tokens = e.seq.num_cached_tokens
        entries = batch.sampling
        t0 = time.perf_counter()
        logits = self.runner.execute(batch)
        # Entry i's logits rows start at offsets[i]: one row, or 1 + len(draft) for a speculative decode.
        offsets, row = [], 0
        for e in entries:
            offsets.append(row)
            row += 1 + len(e.draft)
        emitted: list[list[int]] = [[] for _ in entries]
        plain = [i for i, e in enumerate(entries) if not e.draft]
        if plain:
            sampled = self._sample([entries[i] for i in plain], logits[[offsets[i] for i in plain]])
            for i, t in zip(plain, sampled):
                emitted[i] = [t]
        for i, e in enumerate(entries):
            if e.draft:
                req = self._requests[e.seq.seq_id]
                assert req.spec is not None
                emitted[i] = self.speculator.verify(e, logits[offsets[i] : offsets[i] + 1 + len(e.draft)], req.spec,
                                                    req.sampler)
        if self.speculator.config.enabled:
            self.speculator.account(batch, time.perf_counter() - t0,
                                    {sid: r.spec for sid, r in self._requests.items() if r.spec is not None})

        stopped: set[int] = set()
        deltas: dict[int, list[tuple[Optional[int], str, Optional[tuple[float, list[tuple[int, float]]]]]]] = {}
        results: list[int | list[int]] = []
        for i, e in enumerate(entries):
            req = self._requests[e.seq.seq_id]
            tokens = emitted[i][: max(1, e.seq.max_tokens - e.seq.num_output_tokens)]
            out = deltas.setdefault(req.seq.seq_id, [])
            kept = 0
            for j, token in enumerate(tokens):
                kept = j + 1
                if req.constraint is not None:
                    req.constraint.advance(token)
                if token in self._eog:
                    stopped.add(req.seq.seq_id)
                    out.append((None, "", None))
                    break
                req.out_ids.append(token)
                text, hit = req.stops.push(req.decoder.push(token))
                out.append((token, text, self._logprobs(req, logits[offsets[i] + j], token)))
                if hit:
                    stopped.add(req.seq.seq_id)
                    break
            results.append(tokens[:kept] if e.draft else tokens[0])

        finished = {s.seq_id for s in self.scheduler.update(batch, results, stopped)}
        for e in entries:
            if e.seq.seq_id in self._requests and self._requests[e.seq.seq_id].spec is not None:
                self.speculator.settle(e.seq, e.seq.seq_id in finished)
        outputs = []
        for rid, items in deltas.items():
            req = self._requests[rid]
            for n, (token, text, lp) in enumerate(items):
                if rid in finished and n == len(items) - 1:
                    outputs.append(self._finish(req, req.seq.finish_reason.value, text, token, logprobs=lp))
                else:
                    if text:
                        req.text.append(text)
                    outputs.append(self._deliver(req, RequestOutput(rid, token, text, logprobs=lp)))
        return outputs

    @staticmethod
    def _logprobs(req: _Request, row: torch.Tensor, token: int) -> Optional[tuple[float, list[tuple[int, float]]]]:
        if req.logprobs is None:
            return None
        chosen = float(torch.log_softmax(row.float(), dim=-1)[token])
        return chosen, top_logprobs(row, req.logprobs)

    def _sample(self, entries: list[ScheduledSeq], logits: torch.Tensor) -> list[int]:
        """One token per sampling entry; each row with its own request's parameters, history and generator."""
        reqs = [self._requests[e.seq.seq_id] for e in entries]
        params = [r.sampler.params for r in reqs]
        constrained = [i for i, r in enumerate(reqs) if r.constraint is not None]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                mask = reqs[i].constraint.allowed()  # type: ignore[union-attr]
                if mask is not None:
                    if not bool(mask.any()):  # nothing may follow: the constrained output is complete
                        mask = torch.zeros_like(mask)
                        mask[list(self._eog)] = True
                    logits[i].masked_fill_(~mask, float("-inf"))
        if all(p.greedy and not p.penalizes and not p.logit_bias for p in params):
            return greedy(logits).tolist()
        bp = BatchParams.from_params(params, self.model.config.n_vocab)
        window = None
        if bp.any_penalty:
            window = penalty_windows([r.seq.token_ids for r in reqs], bp.repeat_last_n)
        generators = [None if p.greedy else r.sampler.generator for p, r in zip(params, reqs)]
        return sample_batch(logits, bp, window, generators).tolist()

    # --- bookkeeping -------------------------------------------------------------------------------------

    def _drain(self) -> list[RequestOutput]:
        """Apply queued adds and aborts, in order. Caller holds _lock."""
        outputs = []
        while True:
            with self._wake:
                if not self._inbox:
                    return outputs
                kind, arg = self._inbox.popleft()
            if kind == "add":
                req = arg
                assert isinstance(req, _Request)
                self._requests[req.seq.seq_id] = req
                if req.empty:
                    outputs.append(self._finish(req, FinishReason.LENGTH.value, "", None, ran=False))
                    continue
                try:
                    self.scheduler.add(req.seq)
                except Exception as exc:  # checked in add_request; a race with config is a bug, report it
                    outputs.append(self._finish(req, "error", "", None, ran=False, error=exc))
            else:
                req = self._requests.get(arg)  # type: ignore[arg-type]
                if req is not None and self.scheduler.abort(req.seq.seq_id):
                    outputs.append(self._finish(req, FinishReason.ABORT.value, "", None))

    def _finish(self, req: _Request, reason: str, text: str, token: Optional[int], ran: bool = True,
                error: Optional[BaseException] = None,
                logprobs: Optional[tuple[float, list[tuple[int, float]]]] = None) -> RequestOutput:
        if not req.stops.hit and reason != "abort":
            tail, _ = req.stops.push(req.decoder.flush())
            text += tail + req.stops.flush()
        if text:
            req.text.append(text)
        self._requests.pop(req.seq.seq_id, None)
        self.speculator.release(req.seq.seq_id)
        seq = req.seq
        now = time.monotonic()
        arrival = seq.arrival_time
        first_sched = seq.first_scheduled_time or now
        first_tok = seq.first_token_time or now
        done = seq.finished_time or now
        metrics = RequestMetrics(
            arrival_time=arrival,
            queued_seconds=first_sched - arrival,
            prefill_seconds=first_tok - first_sched,
            first_token_seconds=first_tok - arrival,
            decode_seconds=done - first_tok,
            prompt_tokens=seq.num_prompt_tokens,
            cached_tokens=req.cached_tokens or 0,
            generated_tokens=len(req.out_ids),
            num_preemptions=seq.num_preemptions,
        )
        stats = metrics.stats()
        if req.spec is not None:
            policy = req.spec.policy
            stats.draft_tokens, stats.accepted_tokens, stats.spec_steps = policy.drafted, policy.accepted, policy.steps
        completion = Completion("".join(req.text), list(req.out_ids), reason, stats)
        out = RequestOutput(seq.seq_id, token, text, True, reason, completion, metrics, error, logprobs)
        return self._deliver(req, out)

    def _deliver(self, req: _Request, out: RequestOutput) -> RequestOutput:
        if req.sink is not None:
            try:
                req.sink(out)
            except Exception:  # the consumer's problem (e.g. its event loop closed): never fail the step
                pass
        return out

    def _fail_batch(self, batch: ScheduledBatch, exc: BaseException) -> list[RequestOutput]:
        """A pass raised: end the batch's requests with the error (their KV may be half-written) and close the
        batch so the scheduler goes on with the others."""
        outputs = []
        for e in batch.scheduled:
            req = self._requests.get(e.seq.seq_id)
            if req is not None and self.scheduler.abort(e.seq.seq_id):
                outputs.append(self._finish(req, "error", "", None, error=exc))
        try:
            self.scheduler.update(batch, [0] * len(batch.sampling))  # all entries aborted: tokens are dropped
        except RuntimeError:
            pass  # update() itself had raised after closing the batch
        return outputs

    # --- one request as a stream ---------------------------------------------------------------------------

    def generate_stream(self, prompt_ids: SequenceT[int], options: GenerationOptions = GenerationOptions()
                        ) -> TokenStream:
        """One request as the single-sequence TokenStream: Chunks, then `.result` holds the Completion.

        With the background loop running, it waits on the request's queue; without, it drives step() itself
        (other requests advance too). close() aborts the request."""
        handle = self.submit(prompt_ids, options)
        stream = TokenStream(iter(()))
        stream._chunks = self._chunks(handle, stream)
        return stream

    def _chunks(self, handle: "RequestHandle", stream: TokenStream) -> Iterator[Chunk]:
        try:
            for out in handle:
                if out.error is not None:
                    raise out.error
                if out.token is not None:
                    yield Chunk(out.text, out.token)
                elif out.text:
                    yield Chunk(out.text, -1)
                if out.finished:
                    stream.result = out.completion
        finally:
            if not handle.finished:
                handle.abort()

    def submit(self, prompt_ids: SequenceT[int], options: GenerationOptions = GenerationOptions(),
               logprobs: Optional[int] = None) -> "RequestHandle":
        """Add a request whose outputs collect in a thread-safe queue; iterate the handle to read them."""
        q: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        rid = self.add_request(prompt_ids, options, sink=q.put, logprobs=logprobs)
        return RequestHandle(self, rid, q)

    async def stream(self, prompt_ids: SequenceT[int], options: GenerationOptions = GenerationOptions(),
                     logprobs: Optional[int] = None) -> AsyncIterator[RequestOutput]:
        """Async iterator of one request's outputs; needs start_background(). Cancelling (or leaving the loop
        early) aborts the request."""
        if not self.background_running:
            raise RuntimeError("Engine.stream() needs the background loop: call start_background() first")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.add_request(prompt_ids, options, sink=lambda out: loop.call_soon_threadsafe(q.put_nowait, out),
                               logprobs=logprobs)
        finished = False
        try:
            while not finished:
                out = await q.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    # --- background loop -----------------------------------------------------------------------------------

    @property
    def background_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_background(self) -> None:
        """Start a daemon thread that runs step() whenever there is work. Idempotent."""
        if self.background_running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()

    def stop_background(self, timeout: Optional[float] = None) -> None:
        """Stop the loop after its current step (requests stay queued; step() may be driven by hand again)."""
        thread = self._thread
        if thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._inbox or self._pending or self.scheduler.has_unfinished()):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()  # a failing pass ends its requests with an error output; the loop goes on


class RequestHandle:
    """One submitted request's outputs, in order. Iterating blocks for the next output; without a background
    loop it runs the engine's steps itself."""

    def __init__(self, engine: Engine, request_id: int, outputs: "queue.SimpleQueue[RequestOutput]"):
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self.finished = False

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self.finished:
            out = self._next()
            self.finished = out.finished
            yield out

    def _next(self) -> RequestOutput:
        while True:
            try:
                return self._outputs.get_nowait()
            except queue.Empty:
                pass
            if self.engine.background_running:
                try:
                    return self._outputs.get(timeout=0.1)  # re-check the loop is still there now and then
                except queue.Empty:
                    continue
            with self.engine._lock:  # deliveries happen under it: a step in another thread has finished
                stalled = self._outputs.empty() and not self.engine.has_work()
            if stalled:  # every output goes to the queue, so this is a bug, not something to wait for
                raise RuntimeError(f"request {self.request_id} has no pending work and no output")
            self.engine.step()

    def abort(self) -> None:
        self.engine.abort(self.request_id)

    def result(self) -> Completion:
        """Wait for the end; the Completion (raises the step's error if the request failed)."""
        last = None
        for last in self:
            pass
        if last is None:
            raise RuntimeError("result() of a request already consumed")
        if last.error is not None:
            raise last.error
        assert last.completion is not None
        return last.completion


def _rope_positions(model: Transformer) -> int:
    """How many positions the model's rope tables cover (its n_ctx at load): positions must stay below."""
    n = model.config.n_ctx_train
    for block in model.blocks:
        rope = getattr(getattr(block, "attn", None), "rope", None)
        if rope is not None:
            n = min(n, rope.cos.shape[0])
    return n

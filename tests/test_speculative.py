"""Speculative decoding: proposers, the acceptance rule, rollback in the scheduler, and exactness in the engine.

Exactness is the whole contract: greedy output with speculation must be token-identical to plain decoding,
and sampled output must follow the main model's distribution (checked with chi-square tests, both on the
acceptance rule alone and end to end through the engine with a tiny model).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import ember
from ember.engine.block_manager import BlockManager
from ember.engine.engine import Engine, EngineConfig
from ember.engine.generator import GenerationOptions
from ember.engine.sampler import (BatchParams, SamplingParams, greedy_picks, penalty_windows, sample_batch,
                                  target_distribution)
from ember.engine.scheduler import Scheduler, SchedulerConfig
from ember.engine.sequence import Sequence
from ember.engine.speculative import (MATCH_PRIOR, MatchAcceptance, NgramIndex, Speculation, SpeculativeConfig, accept,
                                     accept_greedy)
from ember.errors import InvalidParameterError
from engine_helpers import run_all as run_engine
from tiny_models import write_tiny_model


def chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square (Wilson-Hilferty; z for alpha = 1e-3 is 3.0902)."""
    z = {1e-3: 3.0902, 1e-2: 2.3263}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic with bins of expected count < 5 merged into one; returns (statistic, dof)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] < 5:  # fold the small tail into the last big bin
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, len(obs) - 1


# --- proposers and policy -------------------------------------------------------------------------------

def test_ngram_index_finds_latest_earlier_occurrence():
    idx = NgramIndex(1, 3)
    idx.extend([5, 6, 7, 8, 5, 6, 9, 4, 5, 6])
    # Suffix (5, 6): latest earlier occurrence ends at index 6, followed by 9, 4, 5, 6.
    assert idx.propose(3) == [9, 4, 5]
    assert idx.propose(10) == [9, 4, 5, 6]
    idx.extend([1])  # suffix (6, 1), (1,): never seen before
    assert idx.propose(3) == []
    # Incremental extension equals building at once.
    tokens = list(np.random.default_rng(0).integers(0, 6, 300))
    a, b = NgramIndex(2, 4), NgramIndex(2, 4)
    a.extend(tokens)
    for t in tokens:
        b.extend([t])
        assert b.propose(4) == _brute_force(tokens[: len(b._tokens)], 2, 4, 4)
    assert a.propose(4) == b.propose(4)


def _brute_force(tokens, nmin, nmax, k):
    for n in range(nmax, nmin - 1, -1):
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                return [int(t) for t in tokens[end : end + k]]
    return []


def test_speculation_adapts_and_backs_off():
    s = Speculation(8)
    assert s.next_length() == 3
    s.record(3, 3)
    assert s.length == 5
    s.record(5, 1)
    assert s.length == 2
    for _ in range(4):
        s.record(2, 0)
    assert [s.next_length() for _ in range(8)] == [0] * 8  # paused after four misses in a row
    assert s.next_length() == 1  # misses shrank the draft to one token
    for _ in range(4):
        s.record(1, 0)
    assert sum(s.next_length() == 0 for _ in range(16)) == 16  # the next pause is twice as long
    assert s.drafted == 20 and s.accepted == 4 and s.steps == 10


def test_speculation_stops_when_measured_cost_says_it_does_not_pay():
    s = Speculation(4)
    for _ in range(4):  # one of two drafts accepted each step (2 tokens emitted)...
        s.record(2, 1)
        s.record_cost(2.5)  # ...at 2.5 plain steps' cost: 0.8 tokens per plain-step time
    assert s.next_length() == 0
    fast = Speculation(4)
    for _ in range(8):
        fast.record(2, 1)
        fast.record_cost(1.6)  # 1.25 tokens per plain-step time: keep going
    assert fast.next_length() > 0


def test_ngram_match_reports_the_matched_length():
    idx = NgramIndex(1, 6)
    idx.extend([1, 2, 3, 4, 9, 9, 2, 3, 4, 7, 3, 4])
    # (3, 4) is the longest suffix seen before; its latest earlier occurrence ends at index 9 (then 7, 3, 4)
    assert idx.match(2) == ([7, 3], 2)
    idx.extend([7, 3])
    # (3, 4, 7, 3) occurred at 7..10: four tokens of match, followed by what follows it up to now
    assert idx.match(5) == ([4, 7, 3], 4)
    idx.extend([5])
    assert idx.match(3) == ([], 0)


def test_match_acceptance_learns_per_match_length_and_gates_drafts():
    a = MatchAcceptance()
    assert a.probability(1) == pytest.approx(MATCH_PRIOR[0])
    assert a.probability(50) == pytest.approx(MATCH_PRIOR[-1])  # long matches share the last bucket
    # Under the prior a long match is worth drafting deep, a one-token match only one token.
    assert a.keep(12, 8, 0.2) == 8
    assert a.keep(1, 8, 0.2) == 1
    assert a.keep(12, 3, 0.2) == 3  # never more than the proposal holds
    # This request's short copies keep failing: drafting from one-token matches stops ...
    for _ in range(10):
        a.record(1, 1, 0)
    assert a.probability(1) < 0.1 and a.keep(1, 8, 0.2) == 0
    # ... while long matches that are accepted keep their depth.
    for _ in range(10):
        a.record(12, 8, 8)
    assert a.keep(12, 8, 0.2) == 8
    # A token rejected at depth j counts against length + j only; the tokens after it are not evidence.
    b = MatchAcceptance()
    b.record(3, 5, 1)  # token 0 (after a 3-match) accepted, token 1 (after a 4-match) rejected
    assert b.probability(3) > MATCH_PRIOR[2] and b.probability(4) < MATCH_PRIOR[3]
    assert b.probability(5) == pytest.approx(MATCH_PRIOR[4])


def test_gated_policy_does_not_pause():
    s = Speculation(8, gated=True)
    assert s.next_length() == 8
    for _ in range(10):  # misses and poor measured cost: the gate, not a pause, cuts the drafts
        s.record(3, 0)
        s.record_cost(3.0)
    assert s.next_length() == 8


def test_draft_length_follows_expected_yield_per_cost():
    s = Speculation(8)
    # alpha 0.6 (prior), cheap rows and a free draft: long drafts pay; a draft pass costing a plain step: none
    assert s.plan(0.05, 0.0) >= 4
    assert s.plan(0.05, 1.0) == 0
    for _ in range(20):  # every draft accepted: deeper drafts pay even at a moderate draft cost
        s.record(4, 4)
    assert s.acceptance_estimate() > 0.9
    assert s.plan(0.05, 0.1) == 8
    for _ in range(60):  # nothing accepted (the old successes decay away): no length pays
        s.record(2, 0)
    assert s.plan(0.05, 0.1) == 0
    # next_length with costs: pauses when nothing pays, then probes once with the adaptive length
    assert s.next_length(0.05, 0.1) == 0
    paused = 0
    while (k := s.next_length(0.05, 0.1)) == 0:
        paused += 1
    assert paused >= 8 and k == s.length
    # A draft that costs about a main step: no plan, and no probe either (even accepted drafts would not pay)
    costly = Speculation(8)
    assert all(costly.next_length(0.07, 1.1) == 0 for _ in range(600))
    assert costly.steps == 0


def test_config_validation():
    with pytest.raises(InvalidParameterError):
        SpeculativeConfig(method="lookahead")
    with pytest.raises(InvalidParameterError):
        SpeculativeConfig(method="ngram", num_tokens=-1)
    with pytest.raises(InvalidParameterError):
        GenerationOptions(draft_num_predict=100)
    assert not SpeculativeConfig(method="ngram", num_tokens=0).enabled


# --- the acceptance rule --------------------------------------------------------------------------------

def test_accept_greedy_takes_the_longest_matching_prefix():
    probs = torch.zeros(4, 10)
    for i, t in enumerate([3, 4, 5, 6]):
        probs[i, t] = 1.0
    assert accept(probs, [3, 4, 5], None) == [3, 4, 5, 6]  # all accepted + bonus
    assert accept(probs, [3, 9, 5], None) == [3, 4]  # correction at the first mismatch
    assert accept(probs, [7, 4, 5], None) == [3]
    assert accept_greedy([3, 4, 5, 6], [3, 4, 5]) == [3, 4, 5, 6]
    assert accept_greedy([3, 4, 5, 6], [3, 9, 5]) == [3, 4]
    assert accept_greedy([3, 4, 5, 6], [7, 4, 5]) == [3]
    with pytest.raises(ValueError):
        accept_greedy([3, 4], [3, 4])


def test_greedy_picks_are_the_samplers_greedy_tokens():
    """Verification's greedy picks (bias and penalties, then the argmax) are what sample_batch gives greedy
    rows: the same stages, the same tie rule."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 50, generator=g)
    logits[2, 7] = logits[2, 9] = 10.0  # a tie: the first index wins on both paths
    params = [SamplingParams(temperature=0, repeat_penalty=1.3, presence_penalty=0.5, repeat_last_n=4,
                             logit_bias={5: 3.0}) for _ in range(6)]
    bp = BatchParams.from_params(params, 50)
    histories = [[1, 2, 3, 5, 7], [8, 9], [], [4, 4, 4], list(range(40)), [5]]
    window = penalty_windows(histories, bp.repeat_last_n)
    picks = greedy_picks(logits, bp, window)
    assert torch.equal(picks, sample_batch(logits, bp, window, [None] * 6))
    assert int(picks[2]) == 7


def test_accept_rejection_sampling_follows_the_target_distribution():
    """Chen et al.'s guarantee for a point-mass proposal: the first emitted token ~ p(row 0) and, when the
    draft was accepted, the second ~ p(row 1) - whatever the draft is."""
    rng = np.random.default_rng(1)
    p0 = torch.tensor(rng.dirichlet(np.ones(8)), dtype=torch.float32)
    p1 = torch.tensor(rng.dirichlet(np.ones(8)), dtype=torch.float32)
    probs = torch.stack([p0, p1])
    draft = int(p0.argsort()[4])  # a middling draft: accepted about p0[draft] of the time
    g = torch.Generator().manual_seed(7)
    first, second = np.zeros(8), np.zeros(8)
    for _ in range(20000):
        out = accept(probs, [draft], g)
        first[out[0]] += 1
        if len(out) == 2:
            second[out[1]] += 1
    for counts, p in ((first, p0), (second, p1)):
        stat, dof = chi2_stat(counts, p.double().numpy() / float(p.sum()))
        assert stat < chi2_critical(dof), (stat, dof)
    assert abs(second.sum() / 20000 - float(p0[draft])) < 0.02


# --- scheduler rollback (no model, no torch in the scheduler) ---------------------------------------------

def test_scheduler_verifies_drafts_and_gives_back_rejected_blocks():
    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_num_batched_tokens=64))
    seq = Sequence(0, list(range(1, 7)), max_tokens=20)  # 6 prompt tokens
    sched.add(seq)
    batch = sched.step()
    sched.update(batch, [50])  # 7 tokens, 6 computed
    bm = sched.block_manager
    seq.draft_token_ids = [51, 52, 53, 54, 55, 56]
    batch = sched.step()
    (entry,) = batch.scheduled
    assert entry.num_tokens == 7 and entry.draft == (51, 52, 53, 54, 55, 56)
    assert len(seq.block_table) == 4  # positions 6..12 need blocks up to index 3
    used = bm.stats().num_used
    sched.update(batch, [[51, 52, 60]])  # two accepted, then a correction
    assert seq.token_ids[6:] == [50, 51, 52, 60]
    assert seq.num_computed_tokens == 9 and seq.num_tokens == 10
    assert seq.draft_token_ids == []
    assert len(seq.block_table) == 3 and bm.stats().num_used == used - 1  # the rejected tail's block is back
    with pytest.raises(ValueError):
        seq.draft_token_ids = [1, 2]
        b = sched.step()
        sched.update(b, [[7, 8]])  # 7 is not the draft


def test_drafts_never_take_a_neighbours_decode_budget_or_blocks():
    sched = Scheduler(SchedulerConfig(num_blocks=5, block_size=4, max_num_seqs=2, max_num_batched_tokens=4))
    a, b = Sequence(0, [1, 2], max_tokens=12), Sequence(1, [4, 5], max_tokens=12)
    sched.add(a)
    sched.add(b)
    sched.update(sched.step(), [7, 8])
    a.draft_token_ids = [9, 9, 9, 9, 9]
    batch = sched.step()
    sizes = {e.seq.seq_id: e.num_tokens for e in batch.scheduled}
    assert sizes[1] == 1 and sizes[0] == 3  # budget 4: b keeps its decode, a drafts 2
    assert not batch.preempted


def test_trim_leaves_shared_prefix_blocks_alone():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Sequence(0, list(range(1, 10)), max_tokens=8)
    bm.allocate(parent, 9)
    parent.num_computed_tokens = 9
    child = Sequence(1, list(range(1, 10)), max_tokens=8)
    bm.fork(parent, child)
    bm.allocate(child, 4)  # speculative pass: positions 9..12
    child.num_computed_tokens = 10  # one accepted
    bm.trim(child)
    assert child.block_table[:2] == parent.block_table[:2]
    assert all(bm.ref_count(b) == 2 for b in parent.block_table[:2])
    assert len(child.block_table) == 3


# --- the engine: greedy identity, distribution -----------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / "tiny.gguf"
    write_tiny_model(path, arch=arch, qtype=T.Q4_0, n_layer=6 if arch == "gemma3" else 2, window=4, seed=3)
    return ember.load(path, n_ctx=256, threads=1)


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A different random model with the same vocabulary: a draft that is mostly wrong."""
    path = tmp_path_factory.mktemp("draft") / "draft.gguf"
    write_tiny_model(path, arch="llama", qtype=T.Q8_0, n_layer=1, seed=9)
    return ember.load(path, n_ctx=256, threads=1)


def repetitive_prompts(m, lengths, seed=0):
    """Prompts that repeat a phrase, so prompt lookup has something to copy."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        phrase = [int(t) for t in rng.integers(3, m.config.n_vocab, 7)]
        out.append(([1] + phrase * (n // 7 + 1))[:n])
    return out


def run_all(engine, prompts, options):
    return [out.completion for out in run_engine(engine, prompts, options)]


@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-other"])
def test_greedy_output_is_identical_to_plain_decoding(tiny, tiny_draft, method):
    m = tiny
    prompts = repetitive_prompts(m, [9, 23, 40, 17], seed=5)
    penalized = SamplingParams(temperature=0)  # default repeat penalty: verification goes through the chain
    plain = SamplingParams(temperature=0, repeat_penalty=1.0)
    options = [GenerationOptions(max_tokens=40, sampling=p) for p in (penalized, plain, penalized, plain)]
    options[3] = GenerationOptions(max_tokens=40, sampling=plain, draft_num_predict=0)  # does not speculate
    cfg = EngineConfig(block_size=4, num_blocks=256)
    base = run_all(Engine(m.model, m.tokenizer, cfg), prompts, options)
    if method == "ngram":
        spec = Engine(m.model, m.tokenizer, EngineConfig(block_size=4, num_blocks=256,
                                                         speculative=SpeculativeConfig("ngram", 6, ngram_min=1)))
    else:
        draft = m.model if method == "draft-self" else tiny_draft.model
        # adaptive=False: always draft 5 - a draft as costly as the model itself would (rightly) never be run
        spec = Engine(m.model, m.tokenizer, EngineConfig(block_size=4, num_blocks=256,
                                                         speculative=SpeculativeConfig("draft", 5, adaptive=False)),
                      draft_model=draft)
    got = run_all(spec, prompts, options)
    for b, g in zip(base, got):
        assert g.ids == b.ids
        assert g.text == b.text and g.finish_reason == b.finish_reason
    st = spec.stats()
    assert st.spec_steps > 0 and st.spec_drafted > 0
    if method == "draft-self":  # the model drafting for itself is right nearly always
        assert st.spec_accepted / st.spec_drafted > 0.8
    assert got[3].stats.draft_tokens == 0
    # Every block went back: nothing leaked by rollback or by the draft's own pool.
    assert spec.scheduler.block_manager.stats().num_used == 0
    if spec.draft is not None:
        assert spec.draft.blocks.stats().num_used == 0


def test_draft_prompt_catch_up_is_not_timed_as_a_drafting_pass(tiny_draft):
    """The draft's first proposal for a request feeds the whole prompt: a prefill, not a drafting pass. Timed as
    one it made the draft look many times a step's cost, and the cost check never drafted again."""
    from ember.engine.draft import DraftProposer
    from ember.engine.sequence import Sequence

    m = tiny_draft
    proposer = DraftProposer(m.model, m.config.n_vocab, num_blocks=64, block_size=4)
    seq = Sequence(0, [1] + list(range(5, 45)), max_tokens=20)  # 41 prompt tokens
    seq.num_computed_tokens = seq.num_tokens - 1
    params = SamplingParams(temperature=0, repeat_penalty=1.0)
    drafts = proposer.propose([(seq, 3, params)])[0]
    assert len(drafts) == 3
    # the prompt went in as catch-up prefill chunks; only the passes that fed one token at a time are timed
    assert proposer.prefill_seconds > 0 and proposer.timed_passes == 2
    seq.append_token(drafts[0])  # the main model accepted the first draft and emitted a correction
    seq.append_token(7)
    proposer.rollback(seq.seq_id, seq.num_tokens - 2)
    assert len(proposer.propose([(seq, 2, params)])[0]) == 2
    assert proposer.prefill_seconds == 0 and proposer.timed_passes == 2  # a 2-token catch-up is a drafting pass


def test_speculation_respects_max_tokens_and_stop_strings(tiny):
    m = tiny
    prompt = repetitive_prompts(m, [30], seed=8)[0]
    plain = SamplingParams(temperature=0, repeat_penalty=1.0)
    cfg = EngineConfig(block_size=4, num_blocks=128)
    spec_cfg = EngineConfig(block_size=4, num_blocks=128, speculative=SpeculativeConfig("draft", 8, adaptive=False))
    for n in (1, 2, 5, 13):
        opts = GenerationOptions(max_tokens=n, sampling=plain)
        (a,) = run_all(Engine(m.model, m.tokenizer, cfg), [prompt], [opts])
        (b,) = run_all(Engine(m.model, m.tokenizer, spec_cfg, draft_model=m.model), [prompt], [opts])
        assert b.ids == a.ids and len(b.ids) == n
    full = run_all(Engine(m.model, m.tokenizer, cfg), [prompt], [GenerationOptions(max_tokens=20, sampling=plain)])
    stop = full[0].text[len(full[0].text) // 2:][:3]
    if stop.strip():
        opts = GenerationOptions(max_tokens=20, sampling=plain, stop=(stop,))
        (a,) = run_all(Engine(m.model, m.tokenizer, cfg), [prompt], [opts])
        (b,) = run_all(Engine(m.model, m.tokenizer, spec_cfg, draft_model=m.model), [prompt], [opts])
        assert (b.text, b.ids) == (a.text, a.ids)


def test_sampled_output_follows_the_main_models_distribution(tiny):
    """Chi-square on the second generated token - the first one a verification pass emits - over many seeds,
    against its exact marginal sum_t1 p(t1) p(t2 | t1) computed from the model's logits. The model drafts for
    itself (greedily): its drafts are its likeliest tokens, so a wrong acceptance or residual rule moves a lot
    of probability mass and the test catches it."""
    m = tiny
    if m.architecture != "llama":
        pytest.skip("one architecture is enough for the statistics; gemma3's tiny model is near-deterministic")
    prompt = repetitive_prompts(m, [12], seed=21)[0]
    params = SamplingParams(temperature=0.4, top_k=0, top_p=1.0, repeat_penalty=1.0)
    V = m.config.n_vocab
    bp = BatchParams.from_params([params], V)

    def dist(ids):
        return target_distribution(torch.tensor(m.logits(ids))[None].float(), bp, None)[0].double().numpy()

    eog = list(m.tokenizer.eog_ids)
    p1 = dist(prompt)
    p1[eog] = 0.0  # runs whose first token ends generation have no second token: condition them away
    marginal = np.zeros(V)
    for t1 in np.nonzero(p1 > 1e-7)[0]:
        p2 = dist(prompt + [int(t1)])
        p2[eog] = 0.0
        marginal += p1[t1] * p2 / p2.sum()
    marginal /= marginal.sum()

    engine = Engine(m.model, m.tokenizer, EngineConfig(block_size=4, num_blocks=1024, max_num_seqs=64,
                                                       speculative=SpeculativeConfig("draft", 3, adaptive=False)),
                    draft_model=m.model)
    n = 3000
    # max_tokens 3: the second token is drafted for (the last token of a request is never drafted).
    opts = [GenerationOptions(max_tokens=3, sampling=SamplingParams(**{**params.__dict__, "seed": s}))
            for s in range(n)]
    outs = run_all(engine, [prompt] * n, opts)
    counts = np.zeros(V)
    for c in outs:
        if len(c.ids) >= 2:
            counts[c.ids[1]] += 1
    assert engine.stats().spec_steps >= n * 0.9  # the second token really came from verification
    stat, dof = chi2_stat(counts, marginal)
    assert dof >= 3 and stat < chi2_critical(dof), (stat, dof)
    st = engine.stats()
    assert 0.1 < st.spec_accepted / st.spec_drafted < 0.9  # both branches of the rule were exercised


def test_speculation_under_memory_pressure_and_prefix_sharing(tiny):
    """More requests than blocks (preemption by recompute) and shared prompt prefixes, with drafts: every
    request still gets exactly its plain greedy output, and no block leaks."""
    m = tiny
    shared = repetitive_prompts(m, [24], seed=30)[0]
    prompts = [shared + p for p in repetitive_prompts(m, [5, 9, 13, 7, 11, 6], seed=31)]
    plain = SamplingParams(temperature=0, repeat_penalty=1.0)
    options = [GenerationOptions(max_tokens=30, sampling=plain)] * len(prompts)
    # Same step budget for both: where the budget cuts a prompt into chunks moves last bits (see engine.py).
    base = run_all(Engine(m.model, m.tokenizer, EngineConfig(block_size=4, num_blocks=256, max_num_seqs=6,
                                                             max_num_batched_tokens=32)), prompts, options)
    tight = EngineConfig(block_size=4, num_blocks=40, max_num_seqs=6, max_num_batched_tokens=32,
                         speculative=SpeculativeConfig("draft", 4, adaptive=False))  # self-draft: forced
    engine = Engine(m.model, m.tokenizer, tight, draft_model=m.model)
    got = run_all(engine, prompts, options)
    assert [g.ids for g in got] == [b.ids for b in base]
    assert engine.num_preemptions > 0 and engine.stats().spec_steps > 0
    assert engine.stats().prefix_hit_tokens > 0
    assert engine.scheduler.block_manager.stats().num_used == 0
    assert engine.draft is not None and engine.draft.blocks.stats().num_used == 0


# --- real models, server --------------------------------------------------------------------------------

def _summary_prompt(m, n_doc_tokens: int) -> list[int]:
    from pathlib import Path

    text = (Path(__file__).parent / "fixtures" / "gpl3.txt").read_text()
    doc = m.tokenizer.decode(m.tokenizer.encode(text, add_special=False)[:n_doc_tokens])
    msgs = [{"role": "user", "content": "Summarize the following document.\n\n" + doc}]
    return m.prompt_ids(m.template.render(msgs, add_generation_prompt=True))


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_reference_models_greedy_identical_with_each_method(name, smollm2_path, gemma3_path):
    path = smollm2_path if name == "smollm2" else gemma3_path
    m = ember.load(path, n_ctx=1024)
    ids = _summary_prompt(m, 300)
    greedy = GenerationOptions(max_tokens=48, sampling=SamplingParams(temperature=0))  # default penalties
    cfg = dict(max_model_len=1024, kv_cache_bytes=64 << 20)
    (base,) = run_all(Engine(m.model, m.tokenizer, EngineConfig(**cfg)), [ids], [greedy])
    ngram = Engine(m.model, m.tokenizer, EngineConfig(**cfg, speculative=SpeculativeConfig("ngram", 6)))
    draft = Engine(m.model, m.tokenizer, EngineConfig(**cfg, speculative=SpeculativeConfig("draft", 4, adaptive=False)),
                   draft_model=m.model)  # self-draft never pays, so only a fixed length makes it draft
    for engine in (ngram, draft):
        (got,) = run_all(engine, [ids], [greedy])
        assert got.ids == base.ids
        assert engine.stats().spec_steps > 0
    assert draft.stats().spec_accepted / draft.stats().spec_drafted > 0.9  # the model drafting for itself


@pytest.mark.model
def test_server_speculates_with_ollama_options_and_reports_metrics(smollm2_path):
    import httpx
    import ollama

    from ember.server.app import ServerConfig, start_in_thread

    srv = start_in_thread(ServerConfig(threads=1, max_loaded=1, speculative="ngram", access_log=False))
    try:
        client = ollama.Client(host=srv.url)
        prompt = "red green blue yellow, " * 4 + "red green"  # raw continuation: a pattern to copy
        plain = client.generate(model="smollm2", prompt=prompt, raw=True,
                                options={"temperature": 0, "num_predict": 40, "draft_num_predict": 0})
        spec = client.generate(model="smollm2", prompt=prompt, raw=True,
                               options={"temperature": 0, "num_predict": 40, "draft_num_predict": 6})
        assert spec.response == plain.response and spec.eval_count == plain.eval_count
        metrics = httpx.get(srv.url + "/metrics").text
        drafted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("ember_speculative_draft_tokens{")]
        assert drafted and drafted[0] > 0
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="smollm2", prompt="hi", options={"draft_num_predict": 99})
        assert e.value.status_code == 400 and "draft_num_predict" in str(e.value)
    finally:
        srv.stop()

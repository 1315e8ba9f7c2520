"""Sampler: each stage against hand-computed examples, the chain's order, reproducibility, and the drawn
distribution against softmax (chi-square)."""
from __future__ import annotations

import math

import pytest
import torch

import ember.engine.sampler as sampler_mod
from ember.engine.sampler import (
    BatchParams,
    Sampler,
    SamplingParams,
    apply_logit_bias,
    apply_repetition_penalties,
    apply_temperature,
    filter_min_p,
    filter_top_p,
    filter_typical,
    penalty_windows,
    sample_batch,
    top_k_candidates,
    top_logprobs,
)
from ember.errors import InvalidParameterError

NEG_INF = float("-inf")
# A 4-token distribution used by several hand computations below.
PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.log(torch.tensor([PROBS]))
# No filters, no penalties: plain softmax sampling at temperature 1.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits[0].tolist()) if v != NEG_INF]


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


# -- parameters ---------------------------------------------------------------------------------------------
def test_defaults_are_ollamas():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.9, 0.0, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty) == (1.1, 64, 0.0, 0.0)
    assert p.logit_bias is None and p.seed is None and not p.greedy
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"), ("temperature", True),
    ("top_k", 1.5), ("top_p", 1.01), ("top_p", -0.1), ("min_p", 2.0), ("typical_p", -1.0),
    ("repeat_penalty", 0.0), ("repeat_penalty", float("inf")), ("repeat_last_n", -2), ("repeat_last_n", 3.0),
    ("presence_penalty", float("inf")), ("frequency_penalty", None), ("seed", -1), ("seed", 2**64),
    ("seed", 1.0), ("logit_bias", [1, 2]), ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: float("inf")}), ("logit_bias", {5: float("nan")}),
])
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value)


def test_logit_bias_is_copied_and_frozen():
    bias = {3: 1.5}
    p = SamplingParams(logit_bias=bias)
    bias[3] = 100.0
    assert p.logit_bias == {3: 1.5}
    with pytest.raises(TypeError):
        p.logit_bias[3] = 2.0  # type: ignore[index]


def test_bias_outside_vocabulary_is_rejected():
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={10: 1.0}), vocab_size=10)


# -- stages, hand-computed ----------------------------------------------------------------------------------
def test_top_k_keeps_the_k_largest_sorted_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0],
                           [9.0, 8.0, 7.0, 6.0, 5.0]])
    values, ids = top_k_candidates(logits, torch.tensor([2, 3]), k_max=3)
    assert ids.tolist() == [[3, 4, 1], [0, 1, 2]]
    assert values.tolist() == [[5.0, 4.0, NEG_INF], [9.0, 8.0, 7.0]]
    # top_k <= 0 is "no limit": with k_max == V that is a full descending sort.
    values, ids = top_k_candidates(logits[:1], torch.tensor([0]), k_max=5)
    assert ids.tolist() == [[3, 4, 1, 2, 0]] and values.tolist() == [[5.0, 4.0, 3.0, 2.0, 1.0]]


@pytest.mark.parametrize("top_p,expected", [
    # cumulative p before each token: 0, 0.5, 0.8, 0.95; keep while it is < top_p (llama.cpp stops after
    # the first token whose running sum reaches top_p).
    (0.45, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]), (0.0, [0]),
])
def test_top_p(top_p, expected):
    assert kept(filter_top_p(LOGITS, torch.tensor([top_p]))) == expected


def test_top_p_and_typical_boundaries_are_llama_cpps():
    # Four equal logits: probabilities are exactly 0.25, so the running sums hit the thresholds exactly.
    # top_p stops at the first token whose sum *reaches* p (>=); typical at the first that *exceeds* it (>).
    uniform = torch.zeros(1, 4)
    assert len(kept(filter_top_p(uniform, torch.tensor([0.5])))) == 2
    assert len(kept(filter_top_p(uniform, torch.tensor([0.75])))) == 3
    assert len(kept(filter_typical(uniform, torch.tensor([0.5])))) == 3
    assert len(kept(filter_typical(uniform, torch.tensor([0.25])))) == 2


def test_draws_never_land_on_removed_tokens():
    from ember.engine.sampler import sample_from_probs

    probs = torch.tensor([[0.0, 0.0, 0.7, 0.0, 0.3, 0.0]])
    assert sample_from_probs(probs, [None]).tolist() == [2]  # no draw (u = 0): first token with p > 0
    gen = torch.Generator().manual_seed(0)
    assert set(sample_from_probs(probs.expand(500, -1), [gen] * 500).tolist()) == {2, 4}


def test_top_p_with_a_larger_distributions_normalizer():
    # The head [0.5, 0.3] of the 4-token distribution: with the full normalizer (log 1 = 0) the head holds 0.8,
    # so top_p 0.7 keeps two tokens; renormalized over the head alone (0.625, 0.375) it would keep one.
    head = LOGITS[:, :2]
    assert kept(filter_top_p(head, torch.tensor([0.6]), log_norm=torch.zeros(1, 1))) == [0, 1]
    assert kept(filter_top_p(head, torch.tensor([0.6]))) == [0]


@pytest.mark.parametrize("min_p,expected", [
    # p >= min_p * 0.5: thresholds 0.25, 0.1, 0.0 (off)
    (0.5, [0, 1]), (0.2, [0, 1, 2]), (0.0, [0, 1, 2, 3]), (1.0, [0]),
])
def test_min_p(min_p, expected):
    assert kept(filter_min_p(LOGITS, torch.tensor([min_p]))) == expected


@pytest.mark.parametrize("typical_p,expected", [
    # H = -sum p ln p = 1.1421; |-ln p - H| = 0.4490, 0.0619, 0.7550, 1.8536, so the typical order is
    # token 1 (p 0.3), 0 (0.5), 2 (0.15), 3 (0.05), cumulative 0.3, 0.8, 0.95, 1.0; keep up to and including
    # the first whose cumulative sum exceeds typical_p. Note 0.2 drops the most likely token.
    (0.2, [1]), (0.5, [0, 1]), (0.9, [0, 1, 2]), (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]),
])
def test_typical(typical_p, expected):
    assert kept(filter_typical(LOGITS, torch.tensor([typical_p]))) == expected


def test_typical_ignores_already_removed_tokens():
    logits = torch.cat([LOGITS, torch.tensor([[NEG_INF, NEG_INF]])], dim=1)
    assert kept(filter_typical(logits, torch.tensor([0.5]))) == [0, 1]


def test_temperature_divides_and_leaves_greedy_rows_alone():
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert apply_temperature(logits, torch.tensor([0.5, 0.0])).tolist() == [[2.0, 4.0], [1.0, 2.0]]


def test_logit_bias_adds_and_bans():
    logits = torch.zeros(1, 4)
    out = apply_logit_bias(logits, torch.tensor([[1, 3]]), torch.tensor([[2.5, NEG_INF]]))
    assert out.tolist() == [[0.0, 2.5, 0.0, NEG_INF]]
    assert logits.tolist() == [[0.0] * 4]  # input untouched


@pytest.mark.parametrize("pairwise", [True, False])
def test_repetition_penalties_llama_cpp_semantics(pairwise, monkeypatch):
    if not pairwise:
        monkeypatch.setattr(sampler_mod, "_PAIRWISE_LIMIT", 0)  # force the dense [B, V] count
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, 3.0, 0.0]])
    window = torch.tensor([[0, 1, 0, 4],      # token 0 twice, 1 and 4 once
                           [-1, -1, -1, -1],  # empty window
                           [3, -1, -1, -1]])  # padding while token 0 is absent must not touch token 0
    out = apply_repetition_penalties(logits, window, torch.tensor([2.0, 2.0, 2.0]),
                                     presence_penalty=torch.tensor([0.5, 0.5, 0.0]),
                                     frequency_penalty=torch.tensor([0.25, 0.25, 0.0]))
    # positive logits are divided, non-positive multiplied, then -= count * 0.25 + 0.5:
    #   t0: 2/2 - 2*0.25 - 0.5 = 0;  t1: -1*2 - 0.25 - 0.5 = -2.75;  t4: 0*2 - 0.25 - 0.5 = -0.75
    assert out[0].tolist() == [0.0, -2.75, 0.5, 3.0, -0.75]
    assert out[1].tolist() == logits[1].tolist()
    assert out[2].tolist() == [2.0, -1.0, 0.5, 1.5, 0.0]


def test_penalty_windows():
    w = penalty_windows([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [2, -1, 0])
    assert w.tolist() == [[3, 4], [5, 6], [-1, -1]]


def test_penalties_apply_only_within_the_window():
    # Token 3 is the best, token 5 a close second. Token 3 was generated once, `n_after` tokens ago.
    logits = torch.zeros(10)
    logits[3], logits[5] = 2.0, 1.9
    n_after = 5
    history = [3] + [1] * n_after

    def pick(n: int) -> int:
        return Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=n), 10).sample(logits, history)

    assert pick(n_after) == 3  # window [1 x 5]: token 3 not in it
    assert pick(n_after + 1) == 5  # window reaches it: 2.0 / 1.5 < 1.9
    assert pick(-1) == 5  # whole history
    assert pick(0) == 3  # disabled


def test_presence_and_frequency_penalties_count_occurrences():
    logits = torch.zeros(4)
    logits[0] = 1.0
    history = [0, 0, 0, 2]
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0, frequency_penalty=0.2, presence_penalty=0.5), 4)
    # token 0: 1 - 3*0.2 - 0.5 = -0.1 < 0 (tokens 1 and 3 untouched, 2 penalized): argmax is token 1
    assert s.sample(logits, history) == 1


# -- the chain ----------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    gen = torch.Generator().manual_seed(0)
    s = Sampler(SamplingParams(temperature=0, repeat_last_n=0), vocab_size=1000)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen)
        assert s.sample(logits, []) == int(logits.argmax())


def test_same_seed_same_tokens_different_seeds_differ():
    logits = torch.zeros(50)  # uniform: every draw is informative

    def run(seed: int) -> list[int]:
        s = Sampler(SamplingParams(seed=seed, **PLAIN), 50)
        return [s.sample(logits, []) for _ in range(40)]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)
    assert Sampler(SamplingParams(seed=7), 50).seed == 7
    assert Sampler(SamplingParams(), 50).seed != Sampler(SamplingParams(), 50).seed  # random when None


def test_sampling_matches_softmax_chi_square():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    probs = torch.softmax(logits, 0).tolist()
    s = Sampler(SamplingParams(seed=2024, **PLAIN), len(probs))
    counts = [0] * len(probs)
    for _ in range(6000):
        counts[s.sample(logits, [])] += 1
    # 7 degrees of freedom: P(chi2 > 24.32) = 0.001. A skewed sampler (e.g. temperature applied twice, or an
    # off-by-one in the inverse CDF) lands in the hundreds.
    assert chi_square(counts, probs) < 24.32, counts


def test_temperature_and_top_k_shape_the_drawn_distribution():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    s = Sampler(SamplingParams(seed=99, **{**PLAIN, "temperature": 2.0, "top_k": 3}), 8)
    counts = [0] * 8
    for _ in range(4000):
        counts[s.sample(logits, [])] += 1
    top3 = [3, 6, 0]
    assert sum(counts[i] for i in top3) == 4000  # nothing outside the top 3
    expected = torch.softmax(logits[top3] / 2.0, 0).tolist()
    assert chi_square([counts[i] for i in top3], expected) < 13.82  # 2 dof, p = 0.001


def test_filters_see_the_distribution_before_temperature():
    # llama.cpp's order: top_p cuts on the untempered probabilities [0.5, 0.3, 0.15, 0.05]. A very hot
    # temperature afterwards flattens the two survivors but cannot bring the others back.
    s = Sampler(SamplingParams(seed=5, temperature=50.0, top_k=0, top_p=0.7, repeat_last_n=0), 4)
    seen = {s.sample(LOGITS[0], []) for _ in range(300)}
    assert seen == {0, 1}


def test_batch_rows_match_single_sequence_samplers():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=gen) * 3
    histories = [[1, 2, 3], [7, 7, 7, 7], list(range(100)), [5]]
    params = [
        SamplingParams(seed=1),
        SamplingParams(seed=2, temperature=0),
        SamplingParams(seed=3, top_k=0, top_p=0.8, min_p=0.05, repeat_penalty=1.3, repeat_last_n=-1),
        SamplingParams(seed=4, top_k=5, typical_p=0.7, presence_penalty=0.4, logit_bias={9: 5.0}),
    ]
    singles = [Sampler(p, 300) for p in params]
    batch = BatchParams.from_params(params, 300)
    batch_gens = [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]
    for step in range(8):
        windows = penalty_windows(histories, batch.repeat_last_n)
        got = sample_batch(logits, batch, windows, batch_gens).tolist()
        want = [s.sample(logits[i], histories[i]) for i, s in enumerate(singles)]
        assert got == want, step
        for h, t in zip(histories, got):
            h.append(t)


def test_a_rows_draws_do_not_depend_on_its_batch_neighbours():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 64, generator=gen)
    p = SamplingParams(seed=42, **PLAIN)
    s = Sampler(p, 64)
    alone = [s.sample(logits[0], []) for _ in range(10)]
    batch = BatchParams.from_params([p, SamplingParams(seed=1), SamplingParams(temperature=0)], 64)
    gens = [torch.Generator().manual_seed(42), torch.Generator().manual_seed(1), None]
    together = [int(sample_batch(logits, batch, None, gens)[0]) for _ in range(10)]
    assert together == alone


@pytest.mark.parametrize("flat", [False, True])
def test_nucleus_head_equals_full_sort(flat, monkeypatch):
    # Rows without top_k but with top_p sample from a head of the sorted vocabulary (256 tokens, growing when
    # the nucleus is wider). Whatever the head, the draws must be those of a full sort.
    V = 5000
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, V, generator=gen) * (0.1 if flat else 4.0)  # flat: nucleus of thousands
    params = [SamplingParams(top_k=0, top_p=0.9, repeat_last_n=0), SamplingParams(top_k=20, repeat_last_n=0)]
    batch = BatchParams.from_params(params, V)
    assert batch.nucleus_only and batch.k_max is None

    def draws() -> list[list[int]]:
        gens = [torch.Generator().manual_seed(100), torch.Generator().manual_seed(200)]
        return [sample_batch(logits, batch, None, gens).tolist() for _ in range(15)]

    head = draws()
    monkeypatch.setattr(sampler_mod, "_NUCLEUS_HEAD", V)  # the head is the whole vocabulary: a full sort
    assert head == draws()


def test_mixed_batch_greedy_rows_take_argmax():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 100, generator=gen)
    params = [SamplingParams(temperature=0, repeat_last_n=0), SamplingParams(seed=1), SamplingParams(temperature=0)]
    batch = BatchParams.from_params(params, 100)
    out = sample_batch(logits, batch, None, [None, torch.Generator().manual_seed(1), None])
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_huge_top_k_means_no_limit():
    logits = torch.tensor([0.0, 1.0, 2.0])
    s = Sampler(SamplingParams(temperature=1.0, top_k=2**70, top_p=1.0, repeat_last_n=0, seed=1), 3)
    assert {s.sample(logits, []) for _ in range(200)} == {0, 1, 2}


def test_non_float32_logits_and_bad_inputs():
    s = Sampler(SamplingParams(temperature=0, repeat_last_n=0), 16)
    logits = torch.arange(16, dtype=torch.bfloat16)
    assert s.sample(logits, []) == 15
    with pytest.raises(InvalidParameterError):
        s.sample(torch.zeros(15), [])
    with pytest.raises(InvalidParameterError):
        Sampler(SamplingParams(), 16).sample(torch.zeros(16), [3, 16])  # id outside the vocabulary
    with pytest.raises(InvalidParameterError):
        Sampler(SamplingParams(), 0)


def test_top_logprobs():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    logp = torch.log_softmax(logits, 0)
    got = top_logprobs(logits, 2)
    assert [t for t, _ in got] == [1, 2]
    assert [v for _, v in got] == pytest.approx([float(logp[1]), float(logp[2])])
    assert math.isclose(sum(math.exp(v) for _, v in top_logprobs(logits, 10)), 1.0, rel_tol=1e-6)
    assert len(top_logprobs(logits, 10)) == 4
    assert top_logprobs(logits, 0) == []
    with pytest.raises(InvalidParameterError):
        top_logprobs(logits, -1)

"""The two real reference models against llama.cpp's own outputs (tests/fixtures/llamacpp_ref.json).

Acceptance of the core issue: teacher-forced greedy agreement, last-position logits, perplexity on GPL-3.
Ember multiplies in bfloat16 while llama.cpp quantizes activations to 8 bits, so exact logits differ by up to
~0.9 on these models; the thresholds below come from the issue and bound that difference.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.perplexity import perplexity

FIX = Path(__file__).parent / "fixtures"
MODELS = {
    # name in fixtures: (catalogue name, near-tie margin, top-10 MAD bound)
    "SmolLM2-135M-Instruct.Q4_1": ("smollm2", 0.75, 1.0),
    "gemma-3-270m-q4_k_m": ("gemma3", 1.5, 2.0),
}

pytestmark = pytest.mark.model


@pytest.fixture(scope="module", params=list(MODELS))
def loaded(request, llamacpp_ref):
    from conftest import reference_model_path

    key = request.param
    return key, ember.load(reference_model_path(MODELS[key][0])), llamacpp_ref["models"][key]


def test_prompt_ids_match_fixture(loaded):
    key, m, ref = loaded
    for g in ref["generate"]:
        assert m.tokenize(g["prompt"]) == g["prompt_ids"]


def test_teacher_forced_greedy_agreement(loaded):
    key, m, ref = loaded
    margin = MODELS[key][1]
    steps = agree = 0
    for g in ref["generate"]:
        p = len(g["prompt_ids"])
        logits = m.logits(g["prompt_ids"] + g["greedy_ids"][:-1], all_positions=True)[p - 1 :]
        for step, want in enumerate(g["greedy_ids"]):
            row = logits[step]
            steps += 1
            if int(row.argmax()) == want:
                agree += 1
            else:  # llama.cpp's choice must be a near-tie in Ember's distribution
                gap = float(row.max() - row[want])
                assert gap <= margin, f"{g['prompt']!r} step {step}: llama.cpp token {want} is {gap:.2f} below top-1"
    assert agree / steps >= 0.90, f"top-1 agreement {agree}/{steps}"


def test_last_prompt_position_logits(loaded):
    key, m, ref = loaded
    bound = MODELS[key][2]
    for g in ref["generate"]:
        row = m.logits(g["prompt_ids"])
        top = g["top10_last_prompt_position"]
        mad = float(np.mean([abs(row[t["id"]] - t["logit"]) for t in top]))
        assert mad <= bound, f"{g['prompt']!r}: top-10 mean |diff| {mad:.3f}"


def test_perplexity_within_one_percent_of_llama_cpp(loaded):
    key, m, ref = loaded
    speed = json.loads((FIX / "llamacpp_speed_ppl.json").read_text())
    corpus = (FIX / "gpl3.txt").read_bytes()
    assert hashlib.sha256(corpus).hexdigest() == speed["corpus"]["sha256"]
    want = speed["models"][key]["llama_perplexity_ppl"]
    got = perplexity(m, corpus.decode("utf-8"), n_ctx=512)
    assert got.scored_tokens == speed["models"][key]["python_ppl_scored_tokens"]
    assert abs(got.perplexity / want - 1) <= 0.01, f"perplexity {got.perplexity:.4f} vs llama.cpp {want:.4f}"


def test_chat_prompt_uses_special_tokens(loaded):
    """The templated prompt turns role markers into their single special tokens, and BOS is not doubled."""
    key, m, ref = loaded
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]
    text = m.template.render(msgs, add_generation_prompt=True)
    ids = m.prompt_ids(text)
    marker = "<|im_start|>" if key.startswith("SmolLM2") else "<start_of_turn>"
    marker_id = m.tokenize(marker, add_special=False, parse_special=True)
    assert len(marker_id) == 1 and ids.count(marker_id[0]) == text.count(marker)
    if m.tokenizer.add_bos:
        assert ids[0] == m.tokenizer.bos_id and ids[1] != m.tokenizer.bos_id


def test_chat_answers_sensibly(loaded):
    key, m, ref = loaded
    if not key.startswith("SmolLM2"):
        pytest.skip("the gemma3-270m file is the pretrained (not instruction-tuned) model")
    out = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=150, temperature=0)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the instruct model ends its turn with <|im_end|>
    assert out.stats.prompt_tokens > 5 and out.stats.generated_tokens == len(out.ids)


def test_seeded_sampling_reproduces(loaded):
    key, m, ref = loaded
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = m.chat(msgs, max_tokens=12, temperature=0.9, seed=42)
    b = m.chat(msgs, max_tokens=12, temperature=0.9, seed=42)
    assert a.ids == b.ids

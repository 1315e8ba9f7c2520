"""`ember bench` on a tiny random model (fields present, numbers positive and self-consistent; no timing
assertions), and the synthetic-model writer of benchmarks/ at a tiny shape."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import ember
from ember.cli import bench as bench_cli
from ember.model.transformer import linear_layers, weight_bytes_per_token
from tiny_models import write_tiny_model

ARGS = ["-p", "16", "-n", "8", "-r", "2", "-t", "1", "--bandwidth-mb", "8"]
N_LAYER = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    write_tiny_model(path, "llama", T.Q4_0, n_layer=N_LAYER)
    return path


def _bench(capsys, path: Path, fmt: str) -> str:
    assert bench_cli.main([str(path), *ARGS, "-o", fmt]) == 0
    return capsys.readouterr().out


def test_json_fields_and_consistency(capsys, tiny):
    rep = json.loads(_bench(capsys, tiny, "json"))
    for key in ("model", "path", "architecture", "quantization", "threads", "n_ctx", "load_seconds",
                "peak_rss_bytes", "weight_bytes_per_token", "mem_bandwidth_gbs", "tests", "tg_bandwidth_gbs"):
        assert key in rep
    assert rep["threads"] == 1
    assert rep["load_seconds"] > 0 and rep["peak_rss_bytes"] > 0 and rep["mem_bandwidth_gbs"] > 0
    assert [t["name"] for t in rep["tests"]] == ["pp16", "tg8"]
    for t in rep["tests"]:
        n = t["n_prompt"] or t["n_gen"]
        assert len(t["samples_s"]) == 2 and all(s > 0 for s in t["samples_s"])
        assert t["samples_ts"] == pytest.approx([n / s for s in t["samples_s"]])
        assert t["avg_ts"] == pytest.approx(statistics.fmean(t["samples_ts"]))
        assert t["stddev_ts"] == pytest.approx(statistics.stdev(t["samples_ts"]))
    tg = rep["tests"][1]
    assert rep["tg_bandwidth_gbs"] == pytest.approx(rep["weight_bytes_per_token"] * tg["avg_ts"] / 1e9)


def test_csv(capsys, tiny):
    rows = list(csv.DictReader(io.StringIO(_bench(capsys, tiny, "csv"))))
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    for r in rows:
        assert set(bench_cli.CSV_FIELDS) == set(r)
        n = int(r["n_prompt"]) or int(r["n_gen"])
        avg_ts, avg_s = float(r["avg_ts"]), float(r["avg_s"])
        assert avg_ts > 0 and avg_s > 0 and int(r["repetitions"]) == 2
        # mean of rates >= rate of the mean time (Jensen), equal when the runs take equal time
        assert avg_ts >= n / avg_s * (1 - 1e-3)
    assert rows[0]["weight_bandwidth_gbs"] == ""
    assert float(rows[1]["weight_bandwidth_gbs"]) == pytest.approx(
        int(rows[1]["weight_bytes_per_token"]) * float(rows[1]["avg_ts"]) / 1e9, rel=1e-2)


def test_table(capsys, tiny):
    out = _bench(capsys, tiny, "table")
    lines = out.splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    tests = [[c.strip() for c in l.split("|")][5] for l in lines[2:4]]
    assert tests == ["pp16", "tg8"]
    for label in ("load time:", "peak RSS:", "weights read per token:", "generation weight bandwidth:"):
        assert any(l.startswith(label) for l in lines), label


def test_weight_bytes_cover_every_linear(tiny):
    m = ember.load(tiny, n_ctx=32, threads=1)
    layers = linear_layers(m.model)
    assert len(layers) == N_LAYER * 4 + 1  # fused qkv, o, fused gate+up, down per block, plus output
    row_bytes = m.model.embedding.rows.shape[1]
    assert weight_bytes_per_token(m.model) == sum(l.nbytes for l in layers) + row_bytes
    m.close()


def test_add_parser_and_validation(tiny):
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", str(tiny), "-p", "0", "-n", "0"])
    assert args.handler is bench_cli.run and args.n_prompt == 0
    from ember.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        bench_cli.run(args)


# -- synthetic models ------------------------------------------------------------------------------------

def _synthetic_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "synthetic_models.py"
    spec = importlib.util.spec_from_file_location("synthetic_models", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("synthetic_models", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("quant,file_type", [("q4_k_m", "Q4_K_M"), ("q8_0", "Q8_0")])
def test_synthetic_tiny_loads(tmp_path, quant, file_type):
    sm = _synthetic_module()
    shape = sm.Shape(n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=32000)
    path = sm.write_synthetic(tmp_path / f"syn-{quant}.gguf", shape, quant)
    m = ember.load(path, n_ctx=32, threads=1)
    assert m.info()["quantization"] == file_type and m.tokenizer.vocab_size == 32000
    types = {name: t.ggml_type for name, t in m.file.tensors.items()}
    if quant == "q4_k_m":
        assert types["output.weight"] == T.Q6_K and types["blk.1.attn_q.weight"] == T.Q4_K
        assert types["blk.2.ffn_down.weight"] == T.Q6_K  # last eighth: more bits
    else:
        assert all(t in (T.Q8_0, T.F32) for t in types.values())
    ids = m.tokenize("the cat sat on the mat")
    logits = m.logits(ids)
    assert logits.shape == (32000,) and np.isfinite(logits).all() and 0 < float(np.std(logits)) < 1e3
    m.close()


def test_synthetic_mix_rule():
    sm = _synthetic_module()
    assert [i for i in range(16) if sm.more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    plan = sm.tensor_plan(sm.SHAPES["1b"], "q4_k_m")
    n_params = sum(math.prod(s) for _, s, _ in plan)
    assert 0.8e9 < n_params < 0.9e9  # 16 x 2048 llama with a 32000 vocab, untied output


def test_speculative_tests_report_acceptance(capsys, tiny):
    """--speculative adds engine generation on a copyable prompt, plain then speculative, with acceptance."""
    assert bench_cli.main([str(tiny), *ARGS, "-o", "json", "--speculative", "ngram"]) == 0
    rep = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in rep["tests"]]
    assert names == ["pp16", "tg8", "sg8 plain", "sg8 ngram"]
    plain, spec = rep["tests"][2], rep["tests"][3]
    assert plain["acceptance"] is None and plain["tokens_per_step"] is None
    # The prompt repeats a block, so lookup drafts; a random tiny model does not copy it, so few or none are
    # accepted (tests/test_speculative.py covers acceptance itself) - the report carries the engine's counts.
    assert 0.0 <= spec["acceptance"] <= 1.0 and spec["tokens_per_step"] >= 1.0
    # The model drafting for itself costs what it saves: the speculator's cost estimate never runs it.
    assert bench_cli.main([str(tiny), *ARGS, "-o", "json", "--speculative", "draft", "--draft", str(tiny)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in rep["tests"]][-1] == "sg8 draft"
    assert rep["tests"][3]["acceptance"] is None and rep["tests"][3]["tokens_per_step"] is None


def test_bench_runs_the_engines_paged_path(tiny):
    """pp/tg time the paged cache the engine uses; its logits are the model's (contiguous reference cache,
    same positions): a bench over some other computation would fail here."""
    import torch

    from ember.bench import PagedRun

    m = ember.load(str(tiny), n_ctx=64)
    try:
        ids = [3, 17, 5, 9, 30, 2, 11]
        run = PagedRun(m.model, 64, block_size=4)
        ref = m.model.new_cache(64)
        got = run.forward(ids[:5], 0)
        want = m.model.forward(torch.tensor(ids[:5]), torch.arange(5), ref)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        for pos in (5, 6):  # decode steps crossing a block boundary
            got = run.forward(ids[pos : pos + 1], pos)
            want = m.model.forward(torch.tensor(ids[pos : pos + 1]), torch.arange(pos, pos + 1), ref)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert run.cache.layout is not None and run.cache.layout.num_tokens == 1
    finally:
        m.close()

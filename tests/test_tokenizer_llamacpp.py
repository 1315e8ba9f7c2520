"""Ember's tokenizers against llama.cpp itself, on the real reference models.

References (all produced by llama.cpp as vendored in llama-cpp-python 0.3.36):
- fixtures/llamacpp_ref.json: the project's reference ids, pieces and round trips;
- fixtures/tokenizer_<name>.json (scripts/make_tokenizer_fixtures.py): ~400 varied strings under every
  add_special/parse_special combination, plus per-vocabulary facts (special ids, add_bos/add_eos, EOG set,
  control ids, attributes, and a hash over every token's piece). Variant fixtures record how their vocabulary was
  derived from a base model ("base", "set", "drop"); the same edits are applied here.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from ember.gguf import open_gguf
from ember.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = sorted(p.stem.removeprefix("tokenizer_") for p in FIXTURES.glob("tokenizer_*.json"))
REF_MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1", "gemma3": "gemma-3-270m-q4_k_m"}

pytestmark = pytest.mark.model


def read_metadata(path: Path) -> dict:
    with open_gguf(path) as f:
        return dict(f.metadata)


@pytest.fixture(scope="session")
def base_metadata(smollm2_path: Path, gemma3_path: Path) -> dict[str, dict]:
    return {"smollm2": read_metadata(smollm2_path), "gemma3": read_metadata(gemma3_path)}


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"tokenizer_{name}.json").read_text())


def fixture_metadata(name: str, fx: dict, base_metadata: dict[str, dict]) -> dict:
    src = fx["source"]
    if "base" not in src:  # a real model's own fixture
        return base_metadata[name]
    md = {k: v for k, v in base_metadata[src["base"]].items() if k not in src["drop"]}
    md.update(src["set"])
    return md


_tokenizers: dict[str, Tokenizer] = {}


@pytest.fixture
def tokenizer_for(base_metadata: dict[str, dict]):
    def get(name: str) -> tuple[Tokenizer, dict]:
        fx = load_fixture(name)
        if name not in _tokenizers:
            _tokenizers[name] = Tokenizer.from_metadata(fixture_metadata(name, fx, base_metadata))
        return _tokenizers[name], fx
    return get


def test_fixtures_cover_required_variants() -> None:
    # the pre-tokenizer variants the runtime must support, each checked against llama.cpp below
    sources = {name: load_fixture(name)["source"] for name in FIXTURE_NAMES}
    pres = {s["set"].get("tokenizer.ggml.pre") for s in sources.values() if "set" in s}
    assert {"llama-bpe", "qwen2", "default", "gpt-2"} <= pres
    assert {"smollm2", "gemma3"} <= set(FIXTURE_NAMES)
    assert all(len(load_fixture(n)["cases"]) >= 300 for n in FIXTURE_NAMES)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_llamacpp_reference_tokenization(name: str, llamacpp_ref: dict, tokenizer_for) -> None:
    tok, _ = tokenizer_for(name)
    for case in llamacpp_ref["models"][REF_MODELS[name]]["tokenize"]:
        text = case["text"]
        assert tok.encode(text) == case["ids_add_special"], text
        ids = tok.encode(text, add_special=False)
        assert ids == case["ids_no_special"], text
        assert [tok.token_to_bytes(i).decode("utf-8", "replace") for i in ids] == case["pieces_no_special"], text
        assert tok.decode(ids) == case["roundtrip_no_special"], text


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_ids_match_llamacpp(name: str, tokenizer_for) -> None:
    tok, fx = tokenizer_for(name)
    mismatches = []
    for case in fx["cases"]:
        for mode in fx["modes"]:
            got = tok.encode(case["text"], add_special=mode[0] == "1", parse_special=mode[1] == "1")
            if got != case[f"ids_{mode}"]:
                mismatches.append((mode, case["text"][:60], got[:12], case[f"ids_{mode}"][:12]))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_vocab_facts_match_llamacpp(name: str, tokenizer_for) -> None:
    tok, fx = tokenizer_for(name)
    assert tok.vocab_size == fx["n_vocab"]
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (fx["bos_id"], fx["eos_id"], fx["eot_id"])
    assert (tok.add_bos, tok.add_eos) == (fx["add_bos"], fx["add_eos"])
    assert sorted(tok.eog_ids) == fx["eog_ids"]
    assert [i for i in range(tok.vocab_size) if tok.is_control(i)] == fx["control_ids"]
    attrs = b"".join(a.to_bytes(4, "little") for a in tok.vocab.attrs)
    assert hashlib.sha256(attrs).hexdigest() == fx["attrs_sha256"]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_every_token_piece_matches_llamacpp(name: str, tokenizer_for) -> None:
    tok, fx = tokenizer_for(name)
    for sid, hexpiece in fx["pieces_sample"].items():
        assert tok.token_to_bytes(int(sid)).hex() == hexpiece, sid
    for special, key in ((True, "pieces_special_sha256"), (False, "pieces_plain_sha256")):
        h = hashlib.sha256()
        for i in range(tok.vocab_size):
            p = tok.token_to_bytes(i, special)
            h.update(len(p).to_bytes(4, "little") + p)
        assert h.hexdigest() == fx[key], key


def test_known_special_facts(tokenizer_for) -> None:
    smol, _ = tokenizer_for("smollm2")
    gemma, _ = tokenizer_for("gemma3")
    assert smol.token_text(2) == "<|im_end|>" and 2 in smol.eog_ids
    assert gemma.token_text(106) == "<end_of_turn>" and 106 in gemma.eog_ids
    assert gemma.is_control(2) and gemma.decode([2], special=False) == "" and gemma.decode([2]) == "<bos>"
    assert gemma.encode("<end_of_turn>", add_special=False, parse_special=True) == [106]
    assert 106 not in gemma.encode("<end_of_turn>", add_special=False, parse_special=False)
    # user-defined tokens (gemma3's whitespace runs) are matched even without parse_special
    assert gemma.token_text(138) == "  " and 138 in gemma.special_ids and not gemma.is_control(138)
    assert gemma.encode("a  b", add_special=False) == gemma.encode("a", add_special=False) + [138] + \
        gemma.encode("b", add_special=False)


def test_variant_built_from_a_written_gguf(base_metadata: dict[str, dict], tmp_path: Path) -> None:
    # The variant fixtures came from vocab-only GGUFs; write one the same way and read it back with Ember's reader.
    from gguf import GGUFWriter

    fx = load_fixture("bpe_qwen2")
    md = fixture_metadata("bpe_qwen2", fx, base_metadata)
    path = tmp_path / "vocab-qwen2.gguf"
    w = GGUFWriter(str(path), md["general.architecture"])
    for key, value in md.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value.tolist() if isinstance(value, np.ndarray) else list(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_metadata(read_metadata(path))
    for case in fx["cases"][::4]:
        assert tok.encode(case["text"], add_special=True) == case["ids_10"], case["text"]


def test_list_metadata_equals_numpy_metadata(base_metadata: dict[str, dict]) -> None:
    fx = load_fixture("gemma3")
    md = base_metadata["gemma3"]
    as_lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in md.items()}
    assert any(isinstance(v, np.ndarray) for v in md.values())
    tok = Tokenizer.from_metadata(as_lists)
    for case in fx["cases"][::5]:
        assert tok.encode(case["text"], parse_special=True) == case["ids_11"], case["text"]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_decode_inverts_encode(name: str, tokenizer_for) -> None:
    tok, fx = tokenizer_for(name)
    # Bytes the vocabulary has no token for are dropped by llama.cpp's BPE (SmolLM2 lacks 7 control bytes);
    # everything else must come back exactly.
    for case in fx["cases"]:
        text = case["text"]
        expected = _drop_unencodable(tok, text)
        assert tok.decode(tok.encode(text, add_special=False)) == expected, text


def _drop_unencodable(tok: Tokenizer, text: str) -> str:
    """`text` without the bytes whose byte-level token the vocabulary lacks."""
    if tok.vocab.kind != "bpe":
        return text
    from ember.tokenizer.bpe import BYTE_TO_CHAR

    t2i = tok.vocab.token_to_id
    data = bytes(b for b in text.encode("utf-8") if BYTE_TO_CHAR[b] in t2i)
    return data.decode("utf-8", "replace")


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_stream_decoder_never_splits_a_character(name: str, tokenizer_for) -> None:
    tok, fx = tokenizer_for(name)
    split_chars = 0
    for case in fx["cases"]:
        ids = tok.encode(case["text"], add_special=False)
        split_chars += sum(1 for i in ids if _incomplete(tok.token_to_bytes(i)))
        dec = tok.stream_decoder()
        parts = [dec.push(i) for i in ids]
        parts.append(dec.flush())
        assert "".join(parts) == tok.decode(ids, special=False)
        for p in parts:  # every chunk is whole characters: it survives a UTF-8 round trip unchanged
            assert p.encode("utf-8").decode("utf-8") == p
            assert "\ufffd" not in p or "\ufffd" in case["text"]
    assert split_chars > 50  # the corpus really does split multi-byte characters across tokens


def _incomplete(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_build_and_encode_speed(base_metadata: dict[str, dict]) -> None:
    text = (FIXTURES / "gpl3.txt").read_text()
    assert len(text.encode("utf-8")) >= 35_000
    for name in ("gemma3", "smollm2"):
        t0 = time.perf_counter()
        tok = Tokenizer.from_metadata(base_metadata[name])
        t1 = time.perf_counter()
        ids = tok.encode(text)
        t2 = time.perf_counter()
        assert tok.decode(ids, special=False) == text
        # generous bounds for a shared 2-core machine; typical: build 0.15 s (gemma3), encode 0.03 s
        assert t1 - t0 < 1.0, f"{name}: build took {t1 - t0:.2f}s"
        assert t2 - t1 < 1.0, f"{name}: encoding 35 KB took {t2 - t1:.2f}s"

"""Tokenizer units on small hand-made vocabularies (no model files): the algorithms' rules as llama.cpp states them
in src/llama-vocab.cpp and src/unicode.cpp, the Unicode table, streaming, and errors."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from ember.errors import GGUFError, InvalidParameterError, UnsupportedError
from ember.tokenizer import StreamDecoder, Tokenizer
from ember.tokenizer.bpe import BYTE_TO_CHAR
from ember.tokenizer.pretokenize import PRE_TOKENIZERS, PreTokenizer, collapse, unicode_class_of
from ember.tokenizer.unicode_table import UNICODE_VERSION

NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6


def spm_metadata(pieces: list[tuple[str, float, int]], **extra) -> dict:
    """An SPM vocabulary: <unk> <s> </s>, the 256 byte tokens, then `pieces` (text, score, type)."""
    tokens = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    tokens += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    tokens += pieces
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t for t, _, _ in tokens],
        "tokenizer.ggml.scores": np.array([s for _, s, _ in tokens], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([k for _, _, k in tokens], dtype=np.int32),
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


def bpe_metadata(words: list[str], merges: list[str], pre: str = "gpt-2", specials: tuple = (), **extra) -> dict:
    """A byte-level BPE vocabulary: all 256 byte characters, then `words` (in GPT-2 characters), then specials."""
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + words + [t for t, _ in specials]
    types = [NORMAL] * (256 + len(words)) + [k for _, k in specials]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


# -- Unicode classes ------------------------------------------------------------------------------------------


def test_unicode_table_agrees_with_unicodedata() -> None:
    # Every code point the running Python assigns (when its Unicode is not newer than the table's) has the same
    # major category in the table; a Python with exactly the table's version must agree on every code point.
    exact = unicodedata.unidata_version == UNICODE_VERSION
    newer = tuple(map(int, unicodedata.unidata_version.split("."))) > tuple(map(int, UNICODE_VERSION.split(".")))
    if newer:
        pytest.skip("this Python's Unicode is newer than llama.cpp's table")
    white = {0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}
    checked = 0
    for cp in range(0x80, 0x40000):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat == "Cn" and not exact:
            continue
        want = "W" if cp in white else (cat[0] if cat[0] in "LNPSM" else "O")
        assert unicode_class_of(ch) == want, hex(cp)
        checked += 1
    assert checked > 140_000


def test_unicode_classes_follow_llamacpp_not_python() -> None:
    # U+001C..U+001F: Python's isspace() says yes, llama.cpp's White_Space table says no.
    assert "\x1c".isspace() and unicode_class_of("\x1c") == "O"
    assert [unicode_class_of(c) for c in " \t\n\u00a0\u3000\u2028\x85"] == ["W"] * 7
    # Assigned in Unicode 15.0/15.1 (CJK Ext. I, Kawi letter), but not yet in 16.0's Garay (unassigned in 15.1).
    assert unicode_class_of("\U0002ebf0") == "L" and unicode_class_of("\U00011f04") == "L"
    assert unicode_class_of("\U00010d50") == "O"
    assert [unicode_class_of(c) for c in "aé1٣.«$€\u0301\u200b"] == list("LLNNPPSSMO")
    assert len(collapse("日本語 text ١٢")) == len("日本語 text ١٢")


# -- pre-tokenizer regexes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,text,words", [
    ("gpt2", "Hello world's 123 !!  x\n\n", ["Hello", " world", "'s", " 123", " !!", " ", " x", "\n\n"]),
    ("gpt2", "x\u00a0\u00a0y", ["x", "\u00a0", "\u00a0", "y"]),  # NBSP is \s but not the optional ' '
    ("gpt2", "a\x1cb", ["a", "\x1c", "b"]),
    ("gpt2", "a\U0002ebf0b", ["a\U0002ebf0b"]),          # a letter in Unicode 15.1
    ("gpt2", "a\U00010d50b", ["a", "\U00010d50", "b"]),  # unassigned in 15.1
    ("gpt2", "I'LL", ["I", "'", "LL"]),                   # gpt2's contractions are lower case only
    ("llama3", "I'LL 1234567 x", ["I", "'LL", " ", "123", "456", "7", " x"]),
    ("llama3", "a  \n\n  b\n", ["a", "  \n\n", " ", " b", "\n"]),
    ("llama3", "!!\n\nok", ["!!\n\n", "ok"]),
    ("llama3", "¿Qué?", ["¿Qué", "?"]),
    ("qwen2", "x1234", ["x", "1", "2", "3", "4"]),
    ("starcoder", "a 12b", ["a", " ", "1", "2", "b"]),
    ("default", "a+b=12345, ok", ["a", "+", "b", "=", "123", "45", ",", " ok"]),
])
def test_pretokenizer_splits(variant: str, text: str, words: list[str]) -> None:
    assert PreTokenizer(variant).split(text) == words


def test_pre_names_table() -> None:
    assert PRE_TOKENIZERS["smollm"].variant == "starcoder"
    assert PRE_TOKENIZERS["llama-bpe"].variant == "llama3" and PRE_TOKENIZERS["llama-bpe"].ignore_merges
    assert PRE_TOKENIZERS["qwen2"].variant == "qwen2"
    assert PRE_TOKENIZERS["default"].variant == "default" and PRE_TOKENIZERS["gpt-2"].variant == "gpt2"


# -- SPM ------------------------------------------------------------------------------------------------------


def test_spm_merges_highest_score_first() -> None:
    # "abc": "ab" (score -1) beats "bc" (-2) although both are bigrams; "abc" itself is reachable from "ab"+"c".
    md = spm_metadata([("a", -5, NORMAL), ("b", -5, NORMAL), ("c", -5, NORMAL), ("ab", -1, NORMAL),
                       ("bc", -2, NORMAL), ("▁", -3, NORMAL)], add_space_prefix=False)
    tok = Tokenizer.from_metadata(md)
    ab, bc, a, c = (tok.vocab.token_to_id[t] for t in ("ab", "bc", "a", "c"))
    assert tok.encode("abc", add_special=False) == [ab, c]
    md["tokenizer.ggml.scores"][tok.vocab.token_to_id["bc"]] = 0.0
    assert Tokenizer.from_metadata(md).encode("abc", add_special=False) == [a, bc]


def test_spm_ties_go_to_the_leftmost_pair() -> None:
    tok = Tokenizer.from_metadata(spm_metadata([("a", -5, NORMAL), ("aa", -1, NORMAL)], add_space_prefix=False))
    a, aa = tok.vocab.token_to_id["a"], tok.vocab.token_to_id["aa"]
    assert tok.encode("aaa", add_special=False) == [aa, a]


def test_spm_byte_fallback_and_space_prefix() -> None:
    # SPM only merges into tokens: "▁hi" is reached through "▁h"
    md = spm_metadata([("▁hi", -1, NORMAL), ("▁h", -2, NORMAL), ("h", -5, NORMAL), ("i", -5, NORMAL),
                       ("▁", -4, NORMAL)])
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos and not tok.add_eos and tok.bos_id == 1 and tok.eos_id == 2  # llama.cpp's SPM defaults
    hi = tok.vocab.token_to_id["▁hi"]
    # add_space_prefix defaults to true for SPM: "hi" is read as " hi"
    assert tok.encode("hi") == [1, hi]
    # "é" is not in the vocabulary: its two UTF-8 bytes become <0xC3> <0xA9> (ids 3 + byte)
    assert tok.encode("hié", add_special=False) == [hi, 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("hié", add_special=False)) == " hié"
    md["tokenizer.ggml.add_space_prefix"] = False
    md["tokenizer.ggml.add_eos_token"] = True
    tok = Tokenizer.from_metadata(md)
    h, i = tok.vocab.token_to_id["h"], tok.vocab.token_to_id["i"]
    assert tok.encode("hi") == [1, h, i, 2]


def test_spm_space_prefix_follows_each_special_token() -> None:
    md = spm_metadata([("▁x", -1, NORMAL), ("x", -2, NORMAL), ("<sep>", 0, CONTROL)])
    tok = Tokenizer.from_metadata(md)
    x_, x, sep = (tok.vocab.token_to_id[t] for t in ("▁x", "x", "<sep>"))
    assert tok.encode("x<sep>x", add_special=False, parse_special=True) == [x_, sep, x_]
    # without parse_special "<sep>" is plain text (bytes), and only the start gets the prefix
    ids = tok.encode("x<sep>x", add_special=False)
    assert ids[0] == x_ and ids[-1] == x and sep not in ids


# -- BPE ------------------------------------------------------------------------------------------------------


def test_bpe_merges_by_rank_then_leftmost() -> None:
    md = bpe_metadata(["ab", "bc", "abc"], ["b c", "a b", "a bc"])
    tok = Tokenizer.from_metadata(md)
    t2i = tok.vocab.token_to_id
    assert tok.encode("abc", add_special=False) == [t2i["abc"]]  # "b c" (rank 0) first, then "a bc"
    md["tokenizer.ggml.merges"] = ["a b", "b c", "a bc"]
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("abc", add_special=False) == [t2i["ab"], t2i["c"]]  # "a b" first; no "ab c" merge
    md = bpe_metadata(["aa"], ["a a"])
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("aaa", add_special=False) == [tok.vocab.token_to_id["aa"], ord("a")]


def test_bpe_spaces_and_bytes() -> None:
    md = bpe_metadata(["Ġx"], ["Ġ x"])
    tok = Tokenizer.from_metadata(md)
    gx = tok.vocab.token_to_id["Ġx"]
    assert tok.encode(" x", add_special=False) == [gx]
    ids = tok.encode("é", add_special=False)  # two bytes, two byte-level tokens
    assert [tok.token_to_bytes(i) for i in ids] == [b"\xc3", b"\xa9"] and tok.decode(ids) == "é"
    assert tok.token_text(gx) == "Ġx" and tok.token_to_bytes(gx) == b" x"


def test_bpe_defaults_and_ignore_merges() -> None:
    md = bpe_metadata(["ab"], [], pre="llama-bpe", specials=(("<|begin|>", CONTROL),), bos_token_id=257)
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos and tok.bos_id == 257  # llama3's default add_bos
    # ignore_merges: a word that is a token is taken whole, even with no merge producing it
    assert tok.encode("ab") == [257, tok.vocab.token_to_id["ab"]]
    md["tokenizer.ggml.pre"] = "gpt-2"
    tok = Tokenizer.from_metadata(md)
    assert not tok.add_bos and tok.encode("ab") == [ord("a"), ord("b")]


def test_unknown_tokenizers_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'nope'"):
        Tokenizer.from_metadata(bpe_metadata([], [], pre="nope"))
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(GGUFError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})


# -- special tokens -------------------------------------------------------------------------------------------


def test_partition_takes_longer_special_tokens_first() -> None:
    # llama.cpp splits out the longest special token everywhere before trying shorter ones, so in "abcd" the
    # later, longer "bcd" wins over the earlier "ab" (a leftmost-first matcher would pick "ab").
    md = bpe_metadata([], [], specials=(("ab", USER), ("bcd", USER)))
    tok = Tokenizer.from_metadata(md)
    ab, bcd = tok.vocab.token_to_id["ab"], tok.vocab.token_to_id["bcd"]
    assert tok.encode("abcd", add_special=False) == [ord("a"), bcd]
    assert tok.encode("ab bcd ab", add_special=False) == [ab, ord(" "), bcd, ord(" "), ab]


def test_user_defined_always_control_only_with_parse_special() -> None:
    md = bpe_metadata([], [], specials=(("<u>", USER), ("<c>", CONTROL)))
    tok = Tokenizer.from_metadata(md)
    u, c = tok.vocab.token_to_id["<u>"], tok.vocab.token_to_id["<c>"]
    assert tok.encode("<u><c>", add_special=False) == [u, ord("<"), ord("c"), ord(">")]
    assert tok.encode("<u><c>", add_special=False, parse_special=True) == [u, c]
    assert tok.special_ids == {u, c} and tok.is_control(c) and not tok.is_control(u)
    assert tok.decode([u, c]) == "<u><c>" and tok.decode([u, c], special=False) == "<u>"


def test_eog_set_as_llamacpp_derives_it() -> None:
    specials = (("<|im_end|>", CONTROL), ("<|endoftext|>", CONTROL), ("<x>", CONTROL), ("<|fim_pad|>", NORMAL))
    md = bpe_metadata([], [], specials=specials, eos_token_id=256)
    tok = Tokenizer.from_metadata(md)
    t2i = tok.vocab.token_to_id
    # EOG texts, eos, and the FIM pad token (detected by text, forced to control)
    assert tok.eog_ids == {t2i["<|im_end|>"], t2i["<|endoftext|>"], t2i["<|fim_pad|>"]}
    assert tok.is_control(t2i["<|fim_pad|>"])
    md["tokenizer.ggml.eos_token_id"] = t2i["<x>"]
    assert t2i["<x>"] in Tokenizer.from_metadata(md).eog_ids


# -- decoding and streaming -----------------------------------------------------------------------------------


def test_stream_decoder_holds_back_partial_characters() -> None:
    tok = Tokenizer.from_metadata(spm_metadata([("a", -1, NORMAL)], add_space_prefix=False))
    byte = lambda b: 3 + b  # noqa: E731  (id of <0xXX>)
    dec = tok.stream_decoder()
    assert isinstance(dec, StreamDecoder)
    # 🦙 = F0 9F A6 99
    assert [dec.push(i) for i in (byte(0xF0), byte(0x9F), byte(0xA6))] == ["", "", ""]
    assert dec.push(byte(0x99)) == "🦙"
    assert dec.push(tok.vocab.token_to_id["a"]) == "a"
    # an invalid byte is replaced as soon as it is known to be invalid; a dangling prefix only at flush
    assert dec.push(byte(0xFF)) == "\ufffd"
    assert dec.push(byte(0xE2)) == "" and dec.push(byte(0x82)) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push(tok.vocab.token_to_id["a"]) == "a"  # reusable after flush
    # control tokens are skipped unless the decoder renders specials
    assert tok.stream_decoder().push(1) == "" and tok.stream_decoder(special=True).push(1) == "<s>"


def test_bad_ids_raise() -> None:
    tok = Tokenizer.from_metadata(spm_metadata([]))
    for bad in (-1, tok.vocab_size):
        with pytest.raises(InvalidParameterError):
            tok.decode([bad])
        with pytest.raises(InvalidParameterError):
            tok.token_text(bad)


def test_lone_surrogates_become_replacement_characters() -> None:
    tok = Tokenizer.from_metadata(bpe_metadata([], []))
    assert tok.encode("a\ud800b", add_special=False) == tok.encode("a\ufffdb", add_special=False)

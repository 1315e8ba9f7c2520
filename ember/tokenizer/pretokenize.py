"""Pre-tokenization for byte-level BPE: split text into words by the regexes llama.cpp uses per `tokenizer.ggml.pre`.

How llama.cpp does it (src/unicode.cpp, `unicode_regex_split`): it rewrites the text into a "collapsed" string with
one byte per code point (ASCII kept, every other code point replaced by a byte naming its Unicode class), rewrites
each `\\p{..}` class in the regex into a byte class over that alphabet, and runs the regexes one after another, each
splitting the pieces the previous one produced (text a regex does not match becomes a piece of its own). The
hand-written splitters it uses for the gpt2 / llama3 / qwen2 regexes behave exactly as those regexes do on this
alphabet, so Ember runs every variant the same way, with Python's `re` on a collapsed string. That keeps the
classification identical to llama.cpp's (Unicode 15.1, frozen in unicode_table.py) whatever Unicode version the
running Python has.

Collapsed alphabet (invariant: `len(collapse(text)) == len(text)`, so match offsets index the original text):

| code point                          | collapsed to | used by      |
|-------------------------------------|--------------|--------------|
| ASCII (< 0x80)                      | itself       | all classes  |
| non-ASCII White_Space               | \\x0b        | \\s           |
| non-ASCII number (N*)               | \\xd1        | \\p{N}        |
| non-ASCII letter (L*)               | \\xd2        | \\p{L}        |
| non-ASCII punctuation (P*)          | \\xd3        | \\p{P}        |
| non-ASCII mark (M*)                 | \\xd4        | \\p{M}        |
| non-ASCII symbol (S*)               | \\xd5        | \\p{S}        |
| anything else (C*, unassigned, ...) | \\xd0        | none         |

`\\s` is spelled out as [\\t\\n\\x0b\\x0c\\r ] because Python's `\\s` also matches U+001C..U+001F, which llama.cpp (C++
std::regex, and its own White_Space table) does not.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ember.errors import UnsupportedError
from ember.tokenizer.unicode_table import RUNS

_CLASS_CHAR = {"W": 0x0B, "N": 0xD1, "L": 0xD2, "P": 0xD3, "M": 0xD4, "S": 0xD5, "O": 0xD0}


def _load_runs() -> tuple[list[int], list[int]]:
    starts: list[int] = []
    chars: list[int] = []
    for entry in "".join(RUNS).split(","):
        if entry:
            starts.append(int(entry[:-1], 16))
            chars.append(_CLASS_CHAR[entry[-1]])
    return starts, chars


_RUN_STARTS, _RUN_CHARS = _load_runs()


class _CollapseMap(dict):
    """str.translate table: ASCII maps to itself, other code points to their class byte (filled in on first use)."""

    def __missing__(self, cp: int) -> int:
        ch = _RUN_CHARS[bisect.bisect_right(_RUN_STARTS, cp) - 1]
        self[cp] = ch
        return ch


_COLLAPSE = _CollapseMap((i, i) for i in range(128))


def collapse(text: str) -> str:
    """The collapsed form of `text` (same length; see the module table)."""
    return text.translate(_COLLAPSE)


# Building blocks of the collapsed regexes: llama.cpp's k_ucat_map gives the ASCII members of each class.
_WS = r"\t\n\x0b\x0c\r "
_L = r"A-Za-z\xd2"
_N = r"0-9\xd1"
_P = r"!-#%-*,-/:;?@\[-\]_{}\xd3"
_S = r"$+<->^`|~\xd5"


def _ascii_class_probe() -> list[str]:
    # ASCII classes, read back from the regex building blocks so the two cannot disagree.
    out = []
    for cp in range(128):
        ch = chr(cp)
        for cls, body in (("W", _WS), ("L", _L), ("N", _N), ("P", _P), ("S", _S)):
            if re.fullmatch(f"[{body}]", ch):
                out.append(cls)
                break
        else:
            out.append("O")
    return out


_ASCII_CLASS_PROBE = _ascii_class_probe()


_CHAR_CLASS = {v: k for k, v in _CLASS_CHAR.items()}


def unicode_class_of(ch: str) -> str:
    """llama.cpp's class of one character: 'W', 'L', 'N', 'P', 'S', 'M' or 'O'."""
    cp = ord(ch)
    if cp < 128:
        return _ASCII_CLASS_PROBE[cp]
    return _CHAR_CLASS[_COLLAPSE[cp]]


# The regexes, in Python syntax over the collapsed alphabet. Each comment gives llama.cpp's original.
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
_GPT2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_WS}{_L}{_N}]+|[{_WS}]+(?![^{_WS}])"
# (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
#   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    rf"{_CONTRACTIONS}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}| ?[^{_WS}{_L}{_N}]+[\r\n]*|[{_WS}]*[\r\n]+"
    rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# As llama3 with \p{N} (one digit per word) instead of \p{N}{1,3}.
_QWEN2 = (
    rf"{_CONTRACTIONS}|[^\r\n{_L}{_N}]?[{_L}]+|[{_N}]| ?[^{_WS}{_L}{_N}]+[\r\n]*|[{_WS}]*[\r\n]+"
    rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)

# Pre-tokenizer variants: the regexes llama.cpp's llm_tokenizer_bpe applies, in order.
# | variant   | regexes (llama.cpp)                                                                   |
# |-----------|---------------------------------------------------------------------------------------|
# | default   | [\p{P}\$\+<=>\^~\|]+ ; gpt2 ; \p{N}+ ; [0-9][0-9][0-9]                                 |
# | gpt2      | gpt2                                                                                  |
# | starcoder | \p{N} ; gpt2   (one digit per word; smollm, refact, command-r, codeshell, exaone, ...) |
# | llama3    | llama3         (\p{N}{1,3}; llama-bpe, dbrx, smaug, chatglm, ...)                      |
# | qwen2     | qwen2          (one digit per word; stablelm2, hunyuan, megrez, ...)                   |
VARIANT_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (rf"[{_P}$+<=>^~|]+", _GPT2, rf"[{_N}]+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "starcoder": (rf"[{_N}]", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}


@dataclass(frozen=True)
class PreSpec:
    """What one `tokenizer.ggml.pre` value means to llama.cpp's BPE tokenizer."""

    variant: str            # key of VARIANT_REGEXES
    ignore_merges: bool     # a word that is itself a token is emitted whole, merges skipped
    add_bos: bool           # default for add_bos when tokenizer.ggml.add_bos_token is absent
    bos_disabled: bool = False  # llama.cpp clears the default BOS id (chatglm)


_LLAMA3_PRE = PreSpec("llama3", ignore_merges=True, add_bos=True)

# tokenizer.ggml.pre -> behaviour, as llama.cpp's llama_vocab::impl::load assigns it (only the variants whose
# regexes Ember implements; anything else is refused rather than tokenized differently).
PRE_TOKENIZERS: dict[str, PreSpec] = {
    "default": PreSpec("default", False, False),
    "": PreSpec("default", False, False),  # missing key: llama.cpp warns and uses 'default'
    **{name: _LLAMA3_PRE for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")},
    "dbrx": PreSpec("llama3", False, False),
    "smaug-bpe": PreSpec("llama3", False, False),
    "chatglm-bpe": PreSpec("llama3", False, False, bos_disabled=True),
    "glm4": PreSpec("llama3", True, False, bos_disabled=True),
    "glm5": PreSpec("llama3", True, False, bos_disabled=True),
    **{name: PreSpec("gpt2", False, False) for name in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
        "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "jina-v1-en",
        "jina-v2-code", "roberta-bpe")},
    **{name: PreSpec("starcoder", False, False) for name in (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2")},
    **{name: PreSpec("qwen2", False, False) for name in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open", "megrez")},
}


def pre_spec(name: str) -> PreSpec:
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        raise UnsupportedError(f"BPE pre-tokenizer '{name}' is not supported") from None


class PreTokenizer:
    """Splits text into words with one variant's regexes (compiled once)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self._regexes = [re.compile(r) for r in VARIANT_REGEXES[variant]]

    def split(self, text: str) -> list[str]:
        """Words of `text`, in order; their concatenation is `text`."""
        if not text:
            return []
        collapsed = collapse(text)
        spans = [(0, len(text))]
        for regex in self._regexes:
            out: list[tuple[int, int]] = []
            append = out.append
            for start, end in spans:
                pos = start
                # finditer(s, pos, endpos) treats endpos as the end of input, as llama.cpp's regex_iterator over
                # [begin, end) does, so (?!\S) at a piece's end succeeds in both.
                for m in regex.finditer(collapsed, start, end):
                    ms, me = m.span()
                    if ms > pos:
                        append((pos, ms))  # unmatched text is a piece of its own
                    if me > ms:
                        append((ms, me))
                    pos = me
                if pos < end:
                    append((pos, end))
            spans = out
        return [text[s:e] for s, e in spans]

"""Splitting special tokens out of text before model tokenization (llama.cpp's `tokenizer_st_partition`).

llama.cpp's rule, mirrored exactly:
- the candidates are all CONTROL, USER_DEFINED and UNKNOWN tokens; without parse_special the CONTROL and UNKNOWN
  ones are skipped, so user-defined tokens (gemma3's whitespace runs, "\\n", HTML tags) are always parsed out;
- candidates are taken one at a time, longest text first; each splits every remaining raw-text fragment at all its
  non-overlapping occurrences, scanning left to right. So a longer token wins over a shorter one anywhere in the
  text, not just at the same position;
- an LSTRIP token eats the whitespace before it, an RSTRIP token the whitespace after it (C isspace).

Only candidates that occur in the text matter, so a trie walk from each position holding a candidate's first
character finds them first; the exact algorithm then runs over those few.
"""
from __future__ import annotations

import re

from ember.tokenizer.vocab import CONTROL, LSTRIP, RSTRIP, UNKNOWN, Vocab

_C_SPACE = " \t\n\x0b\x0c\r"  # C isspace() in the "C" locale


class _Matcher:
    """Finds which of a set of token texts occur in a text."""

    def __init__(self, ids: list[int], tokens: list[str]) -> None:
        self.trie: dict = {}
        for i in ids:
            node = self.trie
            for ch in tokens[i]:
                node = node.setdefault(ch, {})
            node[0] = i  # key 0 (never a character) marks the end of a token text
        firsts = "".join(re.escape(c) for c in self.trie)
        self.starts = re.compile(f"[{firsts}]") if firsts else None

    def present(self, text: str) -> set[int]:
        found: set[int] = set()
        if self.starts is None:
            return found
        n = len(text)
        for m in self.starts.finditer(text):
            node = self.trie
            q = m.start()
            while q < n:
                node = node.get(text[q])
                if node is None:
                    break
                q += 1
                if 0 in node:
                    found.add(node[0])
        return found


class SpecialPartitioner:
    def __init__(self, vocab: Vocab) -> None:
        self._tokens = vocab.tokens
        self._attrs = vocab.attrs
        self._rank = {tid: r for r, tid in enumerate(vocab.special_order)}
        self._all = vocab.special_order
        self._matchers: dict[bool, _Matcher] = {}

    def _matcher(self, parse_special: bool) -> _Matcher:
        m = self._matchers.get(parse_special)
        if m is None:  # built on first use: gemma3 has 6,400 control tokens that plain encodes never need
            ids = self._all if parse_special else [i for i in self._all if not self._attrs[i] & (CONTROL | UNKNOWN)]
            m = self._matchers[parse_special] = _Matcher(ids, self._tokens)
        return m

    def partition(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` cut into raw-text pieces (str) and special token ids (int), in order."""
        if not text:
            return []
        present = self._matcher(parse_special).present(text)
        if not present:
            return [text]
        frags: list[tuple[int, int] | int] = [(0, len(text))]
        for tid in sorted(present, key=self._rank.__getitem__):
            stext = self._tokens[tid]
            attr = self._attrs[tid]
            out: list[tuple[int, int] | int] = []
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    _split(text, frag[0], frag[1], tid, stext, bool(attr & LSTRIP), bool(attr & RSTRIP), out)
            frags = out
        return [f if isinstance(f, int) else text[f[0]:f[1]] for f in frags]


def _split(text: str, s: int, e: int, tid: int, stext: str, lstrip: bool, rstrip: bool,
           out: list[tuple[int, int] | int]) -> None:
    """Split raw fragment text[s:e] at every occurrence of `stext`, appending the pieces to `out`."""
    n = len(stext)
    while True:
        m = text.find(stext, s, e)
        if m < 0:
            if e > s:
                out.append((s, e))
            return
        left_end = m
        if lstrip:
            while left_end > s and text[left_end - 1] in _C_SPACE:
                left_end -= 1
        if left_end > s:
            out.append((s, left_end))
        out.append(tid)
        s = m + n
        if s >= e:
            return
        if rstrip:
            while s < e and text[s] in _C_SPACE:
                s += 1

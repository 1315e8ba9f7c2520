"""Byte-level BPE ("gpt2" tokenizer model), token for token as llama.cpp's llm_tokenizer_bpe_session.

Per raw-text fragment: split into words with the pre-tokenizer, map each word's UTF-8 bytes to GPT-2's printable
byte alphabet (bytes_to_unicode from OpenAI's GPT-2 encoder.py), then within each word repeatedly merge the
adjacent pair with the lowest merge rank, ties going to the leftmost pair. Like llama.cpp this runs on a priority
queue of (rank, left index) with lazy deletion, O(n log n) per word, so long words (digit runs, whitespace runs,
base64) stay cheap. Results are cached per word: natural text repeats words constantly.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

from ember.tokenizer.pretokenize import PreTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

_CACHE_LIMIT = 1 << 16


class BpeModel:
    def __init__(self, token_to_id: dict[str, int], merges: Sequence[str], pre: PreTokenizer,
                 ignore_merges: bool) -> None:
        self._token_to_id = token_to_id
        self._pre = pre
        self._ignore_merges = ignore_merges
        # "left right" -> rank; the first occurrence of a pair wins (llama.cpp's map::emplace keeps the first).
        ranks: dict[tuple[str, str], int] = {}
        for rank in range(len(merges) - 1, -1, -1):
            m = merges[rank]
            pos = m.find(" ", 1)
            ranks[(m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")] = rank
        self._ranks = ranks
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of one raw-text fragment to `out`."""
        cache = self._cache
        for word in self._pre.split(text):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                # latin-1 turns each UTF-8 byte into the code point of the same value, which translate maps
                # to its GPT-2 character.
                ids = cache[word] = self._encode_word(word.encode("utf-8").decode("latin-1")
                                                      .translate(BYTE_TO_CHAR))
            out.extend(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        t2i = self._token_to_id
        if self._ignore_merges and word in t2i:
            return (t2i[word],)
        syms = list(word)  # one GPT-2 character per byte
        n = len(syms)
        if n > 1:
            ranks = self._ranks
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            heap = []
            for i in range(n - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None:
                    heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
            heapq.heapify(heap)
            while heap:
                _, left, right, text = heapq.heappop(heap)
                a, b = syms[left], syms[right]
                # Lazy deletion: skip a pair whose symbols have since been merged away or grown.
                if not a or not b or a + b != text:
                    continue
                syms[left] = text
                syms[right] = ""
                nr = nxt[right]
                nxt[left] = nr
                if nr >= 0:
                    prv[nr] = left
                pl = prv[left]
                if pl >= 0:
                    r = ranks.get((syms[pl], text))
                    if r is not None:
                        heapq.heappush(heap, (r, pl, left, syms[pl] + text))
                if nr >= 0:
                    r = ranks.get((text, syms[nr]))
                    if r is not None:
                        heapq.heappush(heap, (r, left, nr, text + syms[nr]))
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                # A symbol the vocabulary lacks: llama.cpp looks each of its UTF-8 bytes up as a one-byte text and
                # drops those it cannot find (only ASCII can be found that way).
                for byte in s.encode("utf-8"):
                    tid = t2i.get(chr(byte)) if byte < 0x80 else None
                    if tid is not None:
                        ids.append(tid)
        return tuple(ids)

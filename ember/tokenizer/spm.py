"""SentencePiece-style BPE ("llama" tokenizer model), token for token as llama.cpp's llm_tokenizer_spm_session.

Algorithm (llama.cpp, after SentencePiece's bpe_model.cc): spaces become U+2581 "▁"; the text starts as one
symbol per character; every adjacent pair whose concatenation is a vocabulary token goes into a priority queue
keyed by that token's score (highest first, ties to the leftmost pair); the best pair is merged and its new
neighbours queued, until nothing merges. A final symbol that is not a token (a character missing from the
vocabulary) falls back to its UTF-8 bytes as <0xXX> tokens.

(llama.cpp's `resegment` also consults a map of merged texts; a symbol reaching it unmatched is always a single
unmerged character, which that map cannot hold, so byte fallback is the only path that matters.)

Speed: the merge is global over a fragment, but a merge can never cross a boundary between characters c1 c2 that
no token contains as the substring c1+c2. Tokens hold "▁" almost only at their start, so the text is cut before
each "▁" not preceded by a character that some token has right before a "▁"; the pieces ("▁the", "▁cat", ...)
tokenize independently (queue order within a piece is unchanged) and are cached.
"""
from __future__ import annotations

import heapq

SPACE = "\u2581"  # ▁, SentencePiece's escaped space

_CACHE_LIMIT = 1 << 16


class SpmModel:
    def __init__(self, tokens: list[str], token_to_id: dict[str, int], scores: list[float],
                 byte_ids: list[int | None]) -> None:
        self._t2i = token_to_id
        self._scores = scores
        self._byte_ids = byte_ids  # byte value -> id of its fallback token (None when the vocabulary lacks it)
        # Characters that some token holds immediately before a "▁": cutting before "▁" is unsafe after them.
        joins: set[str] = set()
        for t in tokens:
            i = t.find(SPACE, 1)
            while i > 0:
                joins.add(t[i - 1])
                i = t.find(SPACE, i + 1)
        self._joins = joins
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        """Append the ids of one fragment (spaces already escaped to ▁) to `out`."""
        cache = self._cache
        for piece in self._pieces(text):
            ids = cache.get(piece)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[piece] = self._encode_piece(piece)
            out.extend(ids)

    def _pieces(self, text: str) -> list[str]:
        pieces = []
        start = 0
        joins = self._joins
        i = text.find(SPACE, 1)
        while i > 0:
            if text[i - 1] not in joins:
                pieces.append(text[start:i])
                start = i
            i = text.find(SPACE, i + 1)
        pieces.append(text[start:])
        return pieces

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        t2i = self._t2i
        scores = self._scores
        syms = list(text)
        n = len(syms)
        if n > 1:
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            heap = []
            for i in range(n - 1):
                tid = t2i.get(syms[i] + syms[i + 1])
                if tid is not None:
                    # (-score, left): heapq is a min-heap; best score first, then the leftmost pair.
                    heap.append((-scores[tid], i, i + 1, 2))
            heapq.heapify(heap)
            while heap:
                _, left, right, size = heapq.heappop(heap)
                a, b = syms[left], syms[right]
                # Lazy deletion: symbols only grow, so an unchanged total length means the pair is still current.
                if not a or not b or len(a) + len(b) != size:
                    continue
                merged = a + b
                syms[left] = merged
                syms[right] = ""
                nr = nxt[right]
                nxt[left] = nr
                if nr >= 0:
                    prv[nr] = left
                pl = prv[left]
                if pl >= 0:
                    text2 = syms[pl] + merged
                    tid = t2i.get(text2)
                    if tid is not None:
                        heapq.heappush(heap, (-scores[tid], pl, left, len(text2)))
                if nr >= 0:
                    text2 = merged + syms[nr]
                    tid = t2i.get(text2)
                    if tid is not None:
                        heapq.heappush(heap, (-scores[tid], left, nr, len(text2)))
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            for byte in s.encode("utf-8"):
                tid = self._byte_ids[byte]
                if tid is not None:
                    ids.append(tid)
        return tuple(ids)

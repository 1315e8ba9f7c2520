"""Every vocabulary token's bytes, arranged for fast grammar masks; computed once per tokenizer and cached.

- `pieces[i]`: the bytes token i adds to the output (llama.cpp's token_to_piece). Control, user-defined and
  unknown tokens, end-of-generation tokens and tokens without text get b"" and are never offered to a grammar
  (the engine adds end-of-generation itself when the grammar is complete).
- `trie`: the non-empty pieces as a byte trie. A node is `(children: dict[byte, node], ids: list[int])`, the
  ids being the tokens whose piece ends there. Walking it with a grammar state visits each viable prefix once,
  so tokens sharing a prefix share the work, and a dead prefix prunes its whole subtree.
- `plain` / `special_trie`: the split that makes string content cheap. A *plain* piece has only bytes that
  may stand unescaped inside a JSON string (>= 0x20, not `"` or `\\`); inside a string every plain token is
  allowed and leaves the state unchanged, so only the other tokens need walking.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

Trie = tuple[dict, list]

_STRING_SPECIAL = frozenset(range(0x20)) | {0x22, 0x5C}


def _new_node() -> Trie:
    return ({}, [])


def _insert(root: Trie, piece: bytes, token: int) -> None:
    node = root
    for b in piece:
        child = node[0].get(b)
        if child is None:
            child = node[0][b] = _new_node()
        node = child
    node[1].append(token)


@dataclass
class TokenTable:
    n_vocab: int
    pieces: list[bytes]
    eog_ids: tuple[int, ...]
    trie: Trie = field(default_factory=_new_node)
    special_trie: Trie = field(default_factory=_new_node)
    plain: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))

    def __post_init__(self) -> None:
        if len(self.pieces) != self.n_vocab:
            raise ValueError(f"{len(self.pieces)} pieces for a vocabulary of {self.n_vocab}")
        plain = np.zeros(self.n_vocab, dtype=np.bool_)
        plain_ids = []
        for token, piece in enumerate(self.pieces):
            if not piece:
                continue
            _insert(self.trie, piece, token)
            if _STRING_SPECIAL.isdisjoint(piece):
                plain_ids.append(token)
            else:
                _insert(self.special_trie, piece, token)
        plain[plain_ids] = True
        self.plain = plain

    @classmethod
    def from_tokenizer(cls, tokenizer, n_vocab: int) -> "TokenTable":
        """The table for a model whose output has `n_vocab` rows (ids past the tokenizer's vocabulary: no text)."""
        eog = frozenset(tokenizer.eog_ids)
        pieces = []
        for i in range(n_vocab):
            if i >= tokenizer.vocab_size or i in eog or tokenizer.is_special(i):
                pieces.append(b"")
            else:
                pieces.append(tokenizer.token_to_bytes(i, special=False))
        return cls(n_vocab, pieces, tuple(sorted(i for i in eog if i < n_vocab)))


_tables: "weakref.WeakKeyDictionary[object, TokenTable]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def token_table(tokenizer, n_vocab: int) -> TokenTable:
    """The tokenizer's table, built on first use (about a second for 50k tokens) and kept while it lives."""
    with _lock:
        table = _tables.get(tokenizer)
        if table is None or table.n_vocab != n_vocab:
            table = _tables[tokenizer] = TokenTable.from_tokenizer(tokenizer, n_vocab)
        return table


__all__ = ["TokenTable", "token_table"]

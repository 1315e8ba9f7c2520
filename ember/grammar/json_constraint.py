"""Grammar-constrained JSON output: the engine's per-request Constraint (ember.engine.generator.Constraint).

A `JSONGrammar` is a compiled schema (json_schema) over one tokenizer's TokenTable; `new_constraint()` gives
each request its own `JSONConstraint`, which holds only the acceptor state (json_acceptor). Before each token
the engine asks `allowed()`: the tokens whose whole piece the acceptor takes from the current state, found by
walking the token trie (inside strings: the precomputed plain-token mask plus a walk of the few others), and
end-of-generation once the value may end. When the value is complete the mask is all False, which the engine
reads as "only end-of-generation". Masks are cached per state on the grammar (bounded LRU) and shared by every
request with the same schema; callers must not modify them.

A token the acceptor rejects (the engine sampled outside the mask, which it does not do) turns the constraint
off for the rest of the request instead of failing the batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from ember.grammar import json_acceptor as acc
from ember.grammar.json_schema import Node, compile_schema, schema_key
from ember.grammar.token_table import TokenTable, Trie, token_table

MASK_CACHE = 256  # masks kept per grammar (n_vocab bytes each)
GRAMMAR_CACHE = 16  # compiled grammars kept, by (tokenizer table, schema)


def _walk(trie: Trie, state: acc.State, out: list[int]) -> None:
    """Append the ids of every token whose piece the acceptor takes from `state` (trie depth-first)."""
    feed = acc.feed
    stack = [(trie, state)]
    while stack:
        node, s = stack.pop()
        for b, child in node[0].items():
            nxt = feed(s, b)
            if nxt is not None:
                if child[1]:
                    out.extend(child[1])
                if child[0]:
                    stack.append((child, nxt))


class JSONGrammar:
    def __init__(self, root: Node, table: TokenTable):
        self.root = root
        self.table = table
        self.start = acc.initial(root)
        self._masks: OrderedDict[acc.State, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._eog = list(table.eog_ids)
        self._nothing = torch.zeros(table.n_vocab, dtype=torch.bool)

    def new_constraint(self) -> "JSONConstraint":
        return JSONConstraint(self)

    def allowed_ids(self, state: acc.State) -> list[int]:
        """Tokens (not end-of-generation) that may come next, in no particular order."""
        out: list[int] = []
        if state[0] == acc.STR:
            out.extend(np.flatnonzero(self.table.plain).tolist())
            _walk(self.table.special_trie, state, out)
        else:
            _walk(self.table.trie, state, out)
        return out

    def mask(self, state: acc.State) -> torch.Tensor:
        with self._lock:
            cached = self._masks.get(state)
            if cached is not None:
                self._masks.move_to_end(state)
                return cached
        if state[0] == acc.DONE:
            m = self._nothing
        else:
            # Built in numpy: allocating and filling small torch tensors costs milliseconds here.
            ids: list[int] = []
            if state[0] == acc.STR:  # string content: every plain token, and whichever others fit
                a = self.table.plain.copy()
                _walk(self.table.special_trie, state, ids)
            else:
                a = np.zeros(self.table.n_vocab, dtype=np.bool_)
                _walk(self.table.trie, state, ids)
            a[ids] = True
            if self._eog and acc.accepting(state):
                a[self._eog] = True
            m = torch.from_numpy(a)
        with self._lock:
            self._masks[state] = m
            if len(self._masks) > MASK_CACHE:
                self._masks.popitem(last=False)
        return m


class JSONConstraint:
    """One request's position in the grammar (see the module doc)."""

    def __init__(self, grammar: JSONGrammar):
        self.grammar = grammar
        self.state: Optional[acc.State] = grammar.start
        self._eog = frozenset(grammar.table.eog_ids)

    def allowed(self) -> Optional[torch.Tensor]:
        if self.state is None:
            return None
        return self.grammar.mask(self.state)

    def advance(self, token: int) -> None:
        if self.state is None or token in self._eog:
            return
        pieces = self.grammar.table.pieces
        piece = pieces[token] if 0 <= token < len(pieces) else b""
        nxt = acc.feed_bytes(self.state, piece) if piece else None
        self.state = nxt  # None (rejected): unconstrained from here on

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state[0] == acc.DONE


_grammars: OrderedDict[tuple[int, str], JSONGrammar] = OrderedDict()
_grammars_lock = threading.Lock()


def json_grammar(tokenizer: Any, n_vocab: int, schema: Any = None) -> JSONGrammar:
    """The grammar for `schema` (None: any JSON object) over the tokenizer, compiled once and cached. Slow the
    first time for a tokenizer (its TokenTable): call it off the event loop. Raises InvalidParameterError for
    a schema it cannot use."""
    table = token_table(tokenizer, n_vocab)
    key = (id(table), schema_key(schema))  # the cached grammar holds the table, so its id is not reused
    with _grammars_lock:
        grammar = _grammars.get(key)
        if grammar is not None:
            _grammars.move_to_end(key)
            return grammar
    grammar = JSONGrammar(compile_schema(schema), table)
    with _grammars_lock:
        _grammars[key] = grammar
        if len(_grammars) > GRAMMAR_CACHE:
            _grammars.popitem(last=False)
    return grammar


__all__ = ["JSONGrammar", "JSONConstraint", "json_grammar"]

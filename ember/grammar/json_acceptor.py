"""A byte-level pushdown acceptor for JSON values that follow a compiled schema (json_schema.Node).

States are immutable tuples, so a state can be shared, hashed (masks are cached per state) and branched
(a token-trie walk feeds each child byte to the same parent state). The stack is the chain of continuations:
every state that reads a value holds `k`, the state to go on in once that value is complete; the root's `k`
is DONE. `feed(state, byte)` returns the next state or None when the byte cannot follow.

Working on bytes, not characters, lets a token that holds part of a UTF-8 character be judged: inside a string
any byte >= 0x20 other than `"` and `\\` is content; outside strings only ASCII JSON syntax is. Invariants that
keep constrained generation from getting stuck or looping:
- every state but DONE has a byte that continues it towards completion (no dead ends): bounds only ever cut
  optional continuations (more whitespace, more digits);
- whitespace between syntax elements is one space, or one newline and at most MAX_INDENT spaces or tabs (as
  llama.cpp's JSON grammar), and a number has at most MAX_NUMBER bytes (plus a fraction or exponent already
  begun), so a model cannot loop on blank lines, spaces or digits.
"""
from __future__ import annotations

from typing import Any, Optional

from ember.grammar.json_schema import (
    ANY,
    ANY_ARRAY,
    ANY_OBJECT,
    ARRAY,
    INTEGER,
    LITERALS,
    NUMBER,
    OBJECT,
    STRING,
    UNION,
    Node,
)

MAX_INDENT = 20  # spaces or tabs after a newline: room for pretty-printing indentation, no more
MAX_NUMBER = 24  # bytes of a number before it must end (a fraction or exponent in progress may finish)

# State tags (element 0 of every state tuple).
# `ws` in a state is the whitespace read since the last syntax element: 0 none, -1 one space (nothing more may
# follow), n >= 1 a newline and n - 1 spaces or tabs after it.
VALUE = 0  # (VALUE, node, ws, k): before a value
STR = 1  # (STR, k): inside a string; `"` ends it
ESC = 2  # (ESC, k): after a backslash in a string
HEX = 3  # (HEX, digits_left, k): inside \uXXXX
LIT = 4  # (LIT, ((rest, k), ...)): the rest of one of several literal texts, each with its continuation
NUM = 5  # (NUM, phase, length, integer_only, k)
OBJ_KEY = 6  # (OBJ_KEY, obj, ws, first): before a key (or `}` when first); obj = (node, used keys, k)
OBJ_COLON = 7  # (OBJ_COLON, obj, value_node, ws): after a key
OBJ_NEXT = 8  # (OBJ_NEXT, obj, ws): after a member: `,` or `}`
ARR_FIRST = 9  # (ARR_FIRST, arr, ws): after `[`; arr = (node, count, k)
ARR_NEXT = 10  # (ARR_NEXT, arr, ws): after an element: `,` or `]`
DONE = 11  # (DONE,): the root value is complete; nothing may follow

State = tuple
DONE_STATE: State = (DONE,)

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_QUOTE, _BACKSLASH, _COLON, _COMMA = 0x22, 0x5C, 0x3A, 0x2C
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET, _MINUS = 0x7B, 0x7D, 0x5B, 0x5D, 0x2D
_ANY_LITERALS = (b"true", b"false", b"null")

# Number phases: after '-', after a leading 0, integer digits, after '.', fraction digits, after 'e',
# after the exponent's sign, exponent digits. The accepting ones may end the number.
_MINUS_P, _ZERO, _INT, _DOT, _FRAC, _E, _ESIGN, _EXP = range(8)
_NUM_ACCEPTING = frozenset({_ZERO, _INT, _FRAC, _EXP})
_E_BYTES = frozenset(b"eE")


def _ws(ws: int, b: int) -> Optional[int]:
    """The whitespace count after byte `b` (a whitespace byte), or None if it may not come here."""
    if ws == 0:
        return -1 if b == 0x20 else 1 if b == 0x0A else None
    if ws > 0 and (b == 0x20 or b == 0x09) and ws <= MAX_INDENT:
        return ws + 1
    return None


def initial(node: Node) -> State:
    """The state before the root value."""
    return (VALUE, node, 0, DONE_STATE)


def feed(s: State, b: int) -> Optional[State]:
    """The state after byte `b`, or None if `b` cannot come next."""
    tag = s[0]
    if tag == STR:  # the hot case: string content keeps the very same state
        if b == _QUOTE:
            return s[1]
        if b == _BACKSLASH:
            return (ESC, s[1])
        return s if b >= 0x20 else None
    if tag == VALUE:
        if b in _WS:
            ws = _ws(s[2], b)
            return None if ws is None else (VALUE, s[1], ws, s[3])
        return _start(s[1], b, s[3])
    if tag == OBJ_NEXT:
        return _obj_next(s, b)
    if tag == OBJ_KEY:
        return _obj_key(s, b)
    if tag == OBJ_COLON:
        if b in _WS:
            ws = _ws(s[3], b)
            return None if ws is None else (OBJ_COLON, s[1], s[2], ws)
        return (VALUE, s[2], 0, (OBJ_NEXT, s[1], 0)) if b == _COLON else None
    if tag == NUM:
        return _num(s, b)
    if tag == LIT:
        return _literal(s[1], b)
    if tag == ARR_NEXT:
        return _arr_next(s, b)
    if tag == ARR_FIRST:
        return _arr_first(s, b)
    if tag == ESC:
        if b not in _ESCAPES:
            return None
        return (HEX, 4, s[1]) if b == 0x75 else (STR, s[1])
    if tag == HEX:
        if b not in _HEX:
            return None
        return (STR, s[2]) if s[1] == 1 else (HEX, s[1] - 1, s[2])
    return None  # DONE


def feed_bytes(s: Optional[State], data: bytes) -> Optional[State]:
    for b in data:
        if s is None:
            return None
        s = feed(s, b)
    return s


def accepting(s: State) -> bool:
    """Could the output end here (the root value is complete, possibly with more allowed, as in `12`)?"""
    tag = s[0]
    if tag == DONE:
        return True
    if tag == NUM:
        return s[1] in _NUM_ACCEPTING and accepting(s[4])
    if tag == LIT:
        return any(not rest and accepting(k) for rest, k in s[1])
    return False


def accepts(node: Node, text: str | bytes) -> bool:
    """Is `text` a complete value of `node` as the acceptor generates it (whitespace within the bounds)?"""
    data = text.encode("utf-8") if isinstance(text, str) else text
    s = feed_bytes(initial(node), data)
    return s is not None and accepting(s)


def _start(node: Node, b: int, k: State) -> Optional[State]:
    """The first byte of a value of `node`."""
    kind = node.kind
    if kind == STRING:
        return (STR, k) if b == _QUOTE else None
    if kind == OBJECT:
        return (OBJ_KEY, (node, frozenset(), k), 0, True) if b == _LBRACE else None
    if kind == ARRAY:
        return (ARR_FIRST, (node, 0, k), 0) if b == _LBRACKET else None
    if kind == LITERALS:
        return _literal(tuple((lit, k) for lit in node.literals), b)
    if kind == NUMBER or kind == INTEGER:
        if b == _MINUS:
            return (NUM, _MINUS_P, 1, kind == INTEGER, k)
        if b in _DIGITS:
            return (NUM, _ZERO if b == 0x30 else _INT, 1, kind == INTEGER, k)
        return None
    if kind == ANY:
        if b == _QUOTE:
            return (STR, k)
        if b == _LBRACE:
            return (OBJ_KEY, (ANY_OBJECT, frozenset(), k), 0, True)
        if b == _LBRACKET:
            return (ARR_FIRST, (ANY_ARRAY, 0, k), 0)
        if b == _MINUS or b in _DIGITS:
            return (NUM, _MINUS_P if b == _MINUS else _ZERO if b == 0x30 else _INT, 1, False, k)
        return _literal(tuple((lit, k) for lit in _ANY_LITERALS), b)
    if kind == UNION:  # the first alternative that takes this byte (see json_schema's table)
        for alt in node.options:
            nxt = _start(alt, b, k)
            if nxt is not None:
                return nxt
        return None
    raise AssertionError(f"unknown node kind {kind}")


def _literal(cands: tuple[tuple[bytes, State], ...], b: int) -> Optional[State]:
    """Literal texts sharing the bytes read so far. A finished text whose next byte continues no other text
    hands that byte to its continuation (enum [1, 12] then `,`)."""
    nxt = []
    finished = None
    for rest, k in cands:
        if rest:
            if rest[0] == b:
                nxt.append((rest[1:], k))
        elif finished is None:
            finished = k
    if nxt:
        if len(nxt) == 1 and not nxt[0][0]:
            return nxt[0][1]  # exactly one text, now complete
        return (LIT, tuple(nxt))
    if finished is not None:
        return feed(finished, b)
    return None


def _num(s: State, b: int) -> Optional[State]:
    _, phase, n, integer, k = s
    nxt = -1
    if phase == _INT or phase == _FRAC or phase == _EXP:
        if b in _DIGITS and n < MAX_NUMBER:
            nxt = phase
        elif not integer and phase != _EXP:
            if b == 0x2E and phase == _INT and n < MAX_NUMBER:
                nxt = _DOT
            elif b in _E_BYTES and n < MAX_NUMBER:
                nxt = _E
    elif phase == _ZERO:
        if not integer and n < MAX_NUMBER:
            nxt = _DOT if b == 0x2E else _E if b in _E_BYTES else -1
    elif phase == _MINUS_P:
        nxt = _ZERO if b == 0x30 else _INT if b in _DIGITS else -1
    elif phase == _DOT:
        nxt = _FRAC if b in _DIGITS else -1
    elif phase == _E:
        nxt = _ESIGN if b in (0x2B, 0x2D) else _EXP if b in _DIGITS else -1
    elif phase == _ESIGN:
        nxt = _EXP if b in _DIGITS else -1
    if nxt >= 0:
        return (NUM, nxt, n + 1, integer, k)
    if phase in _NUM_ACCEPTING:
        return feed(k, b)  # the number ended: the byte belongs to what follows
    return None


def _obj_key(s: State, b: int) -> Optional[State]:
    _, obj, ws, first = s
    if b in _WS:
        ws = _ws(ws, b)
        return None if ws is None else (OBJ_KEY, obj, ws, first)
    node, used, k = obj
    if b == _QUOTE:
        if node.free is not None:  # undeclared keys (no properties declared): any key, not tracked
            return (STR, (OBJ_COLON, obj, node.free, 0))
        cands = tuple((text[1:], (OBJ_COLON, (node, used | {name}, k), child, 0))
                      for name, text, child in node.keys if name not in used)
        return (LIT, cands) if cands else None
    if b == _RBRACE and first and node.required <= used:
        return k
    return None


def _obj_next(s: State, b: int) -> Optional[State]:
    _, obj, ws = s
    if b in _WS:
        ws = _ws(ws, b)
        return None if ws is None else (OBJ_NEXT, obj, ws)
    node, used, k = obj
    if b == _COMMA:
        return (OBJ_KEY, obj, 0, False) if node.free is not None or len(used) < len(node.keys) else None
    if b == _RBRACE:
        return k if node.required <= used else None
    return None


def _arr_first(s: State, b: int) -> Optional[State]:
    _, arr, ws = s
    if b in _WS:
        ws = _ws(ws, b)
        return None if ws is None else (ARR_FIRST, arr, ws)
    node, _, k = arr
    if b == _RBRACKET:
        return k if node.min_items == 0 else None
    if node.max_items == 0:
        return None
    assert node.items is not None
    return _start(node.items, b, (ARR_NEXT, (node, 1 if node.counts else 0, k), 0))


def _arr_next(s: State, b: int) -> Optional[State]:
    _, arr, ws = s
    if b in _WS:
        ws = _ws(ws, b)
        return None if ws is None else (ARR_NEXT, arr, ws)
    node, count, k = arr
    if b == _COMMA:
        if node.max_items is not None and count >= node.max_items:
            return None
        assert node.items is not None
        return (VALUE, node.items, 0, (ARR_NEXT, (node, count + 1 if node.counts else 0, k), 0))
    if b == _RBRACKET:
        return k if count >= node.min_items else None
    return None


def describe(s: Any) -> str:
    """A short name of a state, for errors and debugging."""
    names = ["value", "string", "escape", "unicode escape", "literal", "number", "object key", "colon",
             "object member end", "array start", "array element end", "done"]
    return names[s[0]] if isinstance(s, tuple) and s and isinstance(s[0], int) and s[0] < len(names) else repr(s)


__all__ = ["initial", "feed", "feed_bytes", "accepting", "accepts", "describe", "State", "DONE", "STR",
           "MAX_INDENT", "MAX_NUMBER"]

"""ember.grammar: the JSON acceptor on valid and invalid texts, schema compilation, and token masks (checked
against a brute-force scan of the vocabulary, on a tiny vocabulary and on SmolLM2's 49152 tokens)."""
from __future__ import annotations

import json
import time

import pytest

from ember.errors import InvalidParameterError
from ember.grammar import json_acceptor as acc
from ember.grammar.json_constraint import JSONGrammar
from ember.grammar.json_schema import JSON_OBJECT, compile_schema
from ember.grammar.token_table import TokenTable

ANY = compile_schema({})

VALID_ANY = [
    '{}', '[]', '"x"', '0', '-0', '12', '-3.25', '1e5', '1E+5', '2.5e-3', 'true', 'false', 'null',
    '{"a": 1, "b": [true, null, "s"], "c": {"d": -0.5}}', '[1,2,[3,[4]]]', '"esc \\" \\\\ \\/ \\n \\u00e9"',
    '"héllo ✓"', ' {"a" : 1 }', '{\n  "k": "v"\n}',
]
INVALID_ANY = [
    '', '{', '{"a"}', '{"a":}', '{"a":1,}', '[1,]', '[,1]', '01', '-', '1.', '1e', '.5', '+1', 'tru', 'nul',
    '"unterminated', '"bad \\x escape"', '"\\u12g4"', '"raw\nnewline"', "{'a': 1}", '{"a":1}}', '[1] 2',
    'NaN', 'Infinity', '{a: 1}',
]


def _strict_loads(text: str):
    """json.loads without Python's NaN/Infinity extension."""
    def bad(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=bad)


@pytest.mark.parametrize("text", VALID_ANY)
def test_acceptor_accepts_valid_json(text):
    assert acc.accepts(ANY, text)
    _strict_loads(text)  # the test's own premise


@pytest.mark.parametrize("text", INVALID_ANY)
def test_acceptor_rejects_invalid_json(text):
    assert not acc.accepts(ANY, text)
    with pytest.raises(ValueError):
        _strict_loads(text)


def test_json_format_root_is_an_object():
    assert acc.accepts(JSON_OBJECT, '{"a": [1]}')
    for text in ('[1]', '"s"', '3', 'true'):
        assert not acc.accepts(JSON_OBJECT, text)


def test_whitespace_and_number_runs_are_bounded():
    assert not acc.accepts(ANY, "{} ")  # the output ends with the value: nothing to loop on after it
    # As llama.cpp's JSON grammar: one space, or a newline and at most MAX_INDENT spaces/tabs.
    assert acc.accepts(ANY, "{\n" + " " * acc.MAX_INDENT + '"a": 1}')
    assert acc.accepts(ANY, '[\n\t\t1,\n\t\t2\n]')
    for bad in ("{\n" + " " * (acc.MAX_INDENT + 1) + '"a": 1}', '{  "a": 1}', '{\n\n"a": 1}', '{ \n"a": 1}',
                '{"a":\r\n1}'):
        assert not acc.accepts(ANY, bad), bad
    assert acc.accepts(ANY, "1" * acc.MAX_NUMBER)
    assert not acc.accepts(ANY, "1" * (acc.MAX_NUMBER + 1))
    # A fraction begun at the limit may still finish: no dead end.
    assert acc.accepts(ANY, "1" * (acc.MAX_NUMBER - 1) + ".5")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "role": {"enum": ["admin", "user", 3]},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
}


@pytest.mark.parametrize("text,ok", [
    ('{"name": "Ann", "age": 30}', True),
    ('{"age": 30, "name": "Ann"}', True),  # any order
    ('{"name": "Ann", "age": 30, "height": 1.7, "tags": ["a", "b"], "role": "admin", "nick": null, "ok": true}',
     True),
    ('{"name": "Ann", "age": 30, "role": 3}', True),
    ('{"name": "Ann", "age": 30, "nick": "A"}', True),
    ('{"name": "Ann"}', False),  # required age missing
    ('{"name": "Ann", "age": 30.5}', False),  # integer
    ('{"name": "Ann", "age": 1e3}', False),
    ('{"name": 5, "age": 30}', False),
    ('{"name": "Ann", "age": 30, "extra": 1}', False),  # undeclared key
    ('{"name": "Ann", "name": "Bob", "age": 30}', False),  # duplicate key
    ('{"name": "Ann", "age": 30, "tags": ["a", "b", "c"]}', False),  # maxItems
    ('{"name": "Ann", "age": 30, "role": "root"}', False),  # enum
    ('{"name": "Ann", "age": 30, "role": 33}', False),
    ('{"name": "Ann", "age": 30, "ok": 1}', False),
    ('[]', False),
])
def test_schema_subset(text, ok):
    assert acc.accepts(compile_schema(PERSON), text) is ok


def test_schema_refs_allof_and_free_objects():
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
        "$ref": "#/$defs/node"}
    node = compile_schema(tree)
    assert acc.accepts(node, '{"v": 1, "kids": [{"v": 2, "kids": []}, {"v": 3}]}')
    assert not acc.accepts(node, '{"v": 1, "kids": [{"kids": []}]}')
    merged = compile_schema({"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]},
                                       {"properties": {"b": {"type": "null"}}, "required": ["b"]}]})
    assert acc.accepts(merged, '{"b": null, "a": "x"}') and not acc.accepts(merged, '{"a": "x"}')
    free = compile_schema({"type": "object", "additionalProperties": {"type": "number"}})
    assert acc.accepts(free, '{"x": 1, "y": 2.5}') and not acc.accepts(free, '{"x": "s"}')
    assert acc.accepts(compile_schema({"type": "object", "additionalProperties": False}), "{}")
    assert not acc.accepts(compile_schema({"type": "object", "additionalProperties": False}), '{"a": 1}')
    assert acc.accepts(compile_schema({"type": ["integer", "null"]}), "null")
    assert acc.accepts(compile_schema({"const": {"k": [1, 2]}}), '{"k":[1,2]}')
    assert acc.accepts(compile_schema({"type": "array", "minItems": 2}), "[1, 2]")
    assert not acc.accepts(compile_schema({"type": "array", "minItems": 2}), "[1]")


@pytest.mark.parametrize("schema", [False, {"enum": []}, {"$ref": "http://example.com/s.json"}, {"type": "text"},
                                    {"$ref": "#/$defs/missing"}, {"type": "array", "minItems": 3, "maxItems": 1}, 5])
def test_bad_schemas_are_rejected(schema):
    with pytest.raises(InvalidParameterError):
        compile_schema(schema)


# -- masks ------------------------------------------------------------------------------------------------------
EOG = 0


def _tiny_table() -> TokenTable:
    pieces = [b"", b"{", b"}", b'"', b'{"', b'":', b'",', b"a", b"ab", b" ", b"  ", b"\n", b"1", b"12", b"-",
              b".", b"true", b"tr", b"ue", b"null", b"[", b"]", b",", b"\\", b"\\n", b'a"', b'"}', b"\xc3", b"\xa9",
              b":", b"e", b"\x01"]
    return TokenTable(len(pieces), pieces, (EOG,))


def _brute(g: JSONGrammar, state) -> set[int]:
    return {i for i, p in enumerate(g.table.pieces) if p and acc.feed_bytes(state, p) is not None}


def _mask_ids(g: JSONGrammar, state) -> set[int]:
    return {i for i, on in enumerate(g.mask(state).tolist()) if on}


@pytest.mark.parametrize("prefix", [b"", b"{", b'{"', b'{"a', b'{"a"', b'{"a":', b'{"a": "x', b'{"a": "x\\',
                                    b'{"a": 1', b'{"a": [', b'{"a": [1,', b'{"a": t', b'{"a": "\xc3'])
def test_masks_match_brute_force_on_a_tiny_vocabulary(prefix):
    g = JSONGrammar(ANY if prefix[:1] != b"{" else JSON_OBJECT, _tiny_table())
    state = acc.feed_bytes(g.start, prefix)
    assert state is not None
    got = _mask_ids(g, state)
    assert got - {EOG} == _brute(g, state)
    assert (EOG in got) == acc.accepting(state)


def test_constraint_follows_tokens_and_ends():
    g = JSONGrammar(JSON_OBJECT, _tiny_table())
    c = g.new_constraint()
    for token in (4, 7, 5, 9, 13, 2):  # {"  a  ":  ' '  12  }
        assert c.allowed()[token]
        c.advance(token)
    assert c.complete and not c.allowed().any()  # all False: the engine allows only end-of-generation
    c.advance(EOG)  # end-of-generation tokens are ignored
    other = g.new_constraint()
    other.advance(2)  # '}' first: outside the grammar, so the request is left unconstrained
    assert other.allowed() is None


@pytest.mark.model
def test_smollm2_masks_are_exact_and_fast(smollm2_path):
    from ember.api import load
    from ember.grammar import json_grammar

    m = load(str(smollm2_path))
    g = json_grammar(m.tokenizer, m.config.n_vocab, PERSON)
    assert g.table.n_vocab == 49152
    text = '{"name": "Zoë \\"Z\\" Ng", "age": 41, "height": -1.5e2, "tags": ["x\\n"], "nick": null, "ok": false}'
    assert acc.accepts(g.root, text)
    ids = m.tokenizer.encode(text, add_special=False)
    c = g.new_constraint()
    times = []
    for i, token in enumerate(ids):
        g._masks.clear()  # time the uncached computation
        t0 = time.perf_counter()
        mask = c.allowed()
        times.append(time.perf_counter() - t0)
        assert mask[token], (i, m.tokenizer.token_to_bytes(token))
        if i % 4 == 0:  # a brute-force check of every 4th state over the whole vocabulary
            assert {int(t) for t in mask.nonzero().flatten()} - set(g.table.eog_ids) == _brute(g, c.state)
        c.advance(token)
    assert c.complete
    mean_ms = 1e3 * sum(times) / len(times)
    print(f"uncached mask: mean {mean_ms:.2f} ms, max {1e3 * max(times):.2f} ms over {len(ids)} tokens")
    assert mean_ms < 20  # the brief's bound, with room for a loaded machine (typically ~0.5 ms)

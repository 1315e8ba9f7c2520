"""JSON schemas compiled to the value nodes the JSON acceptor (json_acceptor.py) walks.

What is enforced (the subset that structured-output clients send: OpenAI `json_schema`, Ollama `format`,
pydantic's `model_json_schema()`):

| schema keyword                        | enforced as                                                          |
|---------------------------------------|----------------------------------------------------------------------|
| type object, properties, required     | only the declared keys, each at most once, in any order; the object   |
|                                       | cannot close before every required key is present                     |
| additionalProperties                  | with `properties`: no other keys are generated (as llama.cpp does);   |
|                                       | without: false -> `{}` only, a schema -> free keys with such values   |
| type array, items, minItems, maxItems | every element follows `items`; the count is bounded                   |
| type string / number / integer /      | the JSON token of that type (integer: no fraction, no exponent)       |
| boolean / null                        |                                                                      |
| type [..], anyOf, oneOf               | a union: the first alternative that accepts the value's first byte    |
|                                       | is followed (so two object alternatives behave as the first one)      |
| enum, const                           | exactly one of the values, written compactly (json.dumps)             |
| allOf                                 | its parts are merged (properties and required joined)                 |
| $ref "#", "#/$defs/..",               | resolved, recursion included                                          |
| "#/definitions/.."                    |                                                                      |

Not enforced (the value may break them): string minLength/maxLength/pattern/format, number minimum/maximum/
multipleOf, uniqueItems, prefixItems, patternProperties, propertyNames, min/maxProperties, not, if/then/else,
dependent*. A remote $ref or a schema that nothing satisfies (false, an empty enum) is an InvalidParameterError.
Whatever the schema, generated numbers have at most json_acceptor.MAX_NUMBER bytes and whitespace is one
space or one newline plus indentation (json_acceptor.MAX_INDENT).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ember.errors import InvalidParameterError

# Node kinds.
ANY, OBJECT, ARRAY, STRING, NUMBER, INTEGER, LITERALS, UNION = range(8)


@dataclass(eq=False)  # compared and hashed by identity: nodes may be recursive ($ref) and are used as dict keys
class Node:
    kind: int
    # OBJECT: declared keys as (name, its JSON text, value node); `free` is the value node of undeclared keys when
    # no key is declared (None: no free keys). Invariant: required names are all declared.
    keys: tuple[tuple[str, bytes, "Node"], ...] = ()
    required: frozenset[str] = frozenset()
    free: "Node | None" = None
    # ARRAY
    items: "Node | None" = None
    min_items: int = 0
    max_items: int | None = None
    # LITERALS: the compact JSON texts of the allowed values, distinct
    literals: tuple[bytes, ...] = ()
    # UNION
    options: tuple["Node", ...] = ()

    @property
    def counts(self) -> bool:
        """An array whose element count matters (the acceptor then tracks it)."""
        return self.min_items > 0 or self.max_items is not None


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


ANY_NODE = Node(ANY)
ANY_OBJECT = Node(OBJECT, free=ANY_NODE)
ANY_ARRAY = Node(ARRAY, items=ANY_NODE)
BOOLEAN_NODE = Node(LITERALS, literals=(b"true", b"false"))
NULL_NODE = Node(LITERALS, literals=(b"null",))
# What `format: "json"` / `json_object` ask for: an object (llama.cpp's and Ollama's JSON grammar root).
JSON_OBJECT = ANY_OBJECT

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaCompiler:
    """One schema document: resolves local $refs (each compiled once, so recursion terminates)."""

    def __init__(self, root: Any):
        self.root = root
        self.refs: dict[str, Node] = {}

    def compile(self, schema: Any, where: str = "schema") -> Node:
        if schema is True or schema is None or schema == {}:
            return ANY_NODE
        if schema is False:
            raise InvalidParameterError(f"{where} is false: no value satisfies it")
        if not isinstance(schema, dict):
            raise InvalidParameterError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "allOf" in schema:
            return self.compile(self._merge_all_of(schema, where), where)
        if "const" in schema:
            return Node(LITERALS, literals=(_dump(schema["const"]),))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise InvalidParameterError(f"{where}.enum must be a non-empty list")
            return Node(LITERALS, literals=tuple(dict.fromkeys(_dump(v) for v in values)))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise InvalidParameterError(f"{where}.{key} must be a non-empty list")
                base = {k: v for k, v in schema.items() if k != key}
                nodes = [self.compile({**base, **alt} if isinstance(alt, dict) else alt, f"{where}.{key}[{i}]")
                         for i, alt in enumerate(alts)]
                return nodes[0] if len(nodes) == 1 else Node(UNION, options=tuple(nodes))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise InvalidParameterError(f"{where}.type must not be an empty list")
            nodes = [self.compile({**schema, "type": k}, where) for k in dict.fromkeys(kind)]
            return nodes[0] if len(nodes) == 1 else Node(UNION, options=tuple(nodes))
        if kind is None:
            if "properties" in schema or "required" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "minItems" in schema or "maxItems" in schema:
                kind = "array"
            else:
                return ANY_NODE
        if kind not in _TYPES:
            raise InvalidParameterError(f"{where}.type {kind!r} is not one of {', '.join(_TYPES)}")
        if kind == "object":
            return self._object(schema, where)
        if kind == "array":
            return self._array(schema, where)
        return {"string": Node(STRING), "number": Node(NUMBER), "integer": Node(INTEGER),
                "boolean": BOOLEAN_NODE, "null": NULL_NODE}[kind]

    def _ref(self, ref: Any, where: str) -> Node:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise InvalidParameterError(f"{where}.$ref {ref!r}: only local references (#/...) are supported")
        node = self.refs.get(ref)
        if node is not None:
            return node
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise InvalidParameterError(f"{where}.$ref {ref!r} does not resolve")
            target = target[part]
        # A placeholder first, so that a recursive reference finds it; filled in place once compiled.
        node = self.refs[ref] = Node(ANY)
        compiled = self.compile(target, ref)
        node.__dict__.update(compiled.__dict__)
        return node

    def _merge_all_of(self, schema: dict, where: str) -> dict:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise InvalidParameterError(f"{where}.allOf must be a non-empty list")
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in parts:
            for _ in range(32):  # follow $refs to the keywords they name (bounded: refs may loop)
                if not isinstance(part, dict) or "$ref" not in part:
                    break
                ref = part["$ref"]
                if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                    raise InvalidParameterError(f"{where}.allOf $ref {ref!r}: only local references are supported")
                target: Any = self.root
                for p in ref[2:].split("/") if ref != "#" else ():
                    target = target.get(p.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
                if not isinstance(target, dict):
                    raise InvalidParameterError(f"{where}.allOf $ref {ref!r} does not resolve")
                part = {**{k: v for k, v in part.items() if k != "$ref"}, **target}
            if not isinstance(part, dict):
                continue
            for key, value in part.items():
                if key == "properties" and isinstance(value, dict):
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required" and isinstance(value, list):
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                else:
                    merged.setdefault(key, value)
        return merged

    def _object(self, schema: dict, where: str) -> Node:
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(props, dict) or not isinstance(required, list) \
                or not all(isinstance(r, str) for r in required):
            raise InvalidParameterError(f"{where}: properties must be an object and required a list of names")
        extra = schema.get("additionalProperties", True)
        node = Node(OBJECT, required=frozenset(required))
        if not props and not required:
            node.free = None if extra is False else self.compile(extra, f"{where}.additionalProperties")
            return node
        keys = []
        for name, sub in props.items():
            keys.append((name, _dump(name), self.compile(sub, f"{where}.properties.{name}")))
        for name in required:  # required but not described: any value
            if name not in props:
                keys.append((name, _dump(name), ANY_NODE if extra in (True, False) else
                             self.compile(extra, f"{where}.additionalProperties")))
        node.keys = tuple(keys)
        return node

    def _array(self, schema: dict, where: str) -> Node:
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0 or hi is not None and (
                isinstance(hi, bool) or not isinstance(hi, int) or hi < lo):
            raise InvalidParameterError(f"{where}: minItems/maxItems must be integers with 0 <= minItems <= maxItems")
        return Node(ARRAY, items=self.compile(schema.get("items", True), f"{where}.items"), min_items=lo,
                    max_items=hi)


def compile_schema(schema: Any) -> Node:
    """The root node for a JSON schema; None means `format: "json"` (any JSON object)."""
    if schema is None:
        return JSON_OBJECT
    return SchemaCompiler(schema).compile(schema)


def schema_key(schema: Any) -> str:
    """A canonical text of the schema, for caching compiled grammars."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


__all__ = ["Node", "compile_schema", "schema_key", "ANY", "OBJECT", "ARRAY", "STRING", "NUMBER", "INTEGER",
           "LITERALS", "UNION", "ANY_NODE", "ANY_OBJECT", "ANY_ARRAY", "JSON_OBJECT"]

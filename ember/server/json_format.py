"""JSON output on request (Ollama `format`, OpenAI `response_format`): grammar-constrained, and instructed.

The model is told to answer in JSON (and given the schema, when there is one), and its tokens are constrained
by ember.grammar so that the text is one JSON value: an object for "json" / json_object, a value following
the schema otherwise (for the subset json_schema.py enforces). Generation ends when the value is complete.
The text can still fail to parse when generation stops first (max_tokens, a stop string, the context end);
non-streamed answers say whether it parses in the X-Ember-JSON-Valid header.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import anyio

from ember.engine.generator import Constraint
from ember.grammar import json_grammar
from ember.server.models import LoadedModel

JSON_INSTRUCTION = "Respond only with a single valid JSON object, and nothing else."
JSON_VALID_HEADER = "X-Ember-JSON-Valid"  # on non-streamed JSON answers: does the text parse?


@dataclass(frozen=True)
class JSONFormat:
    schema: dict[str, Any] | None = None  # None: any JSON object

    def __post_init__(self) -> None:
        if self.schema is not None and not isinstance(self.schema, dict):
            raise TypeError("a JSON schema is a dict")

    def instruction(self) -> str:
        if self.schema is not None:
            return f"{JSON_INSTRUCTION} It must match this JSON schema: {json.dumps(self.schema)}"
        return JSON_INSTRUCTION

    async def constraint(self, lm: LoadedModel) -> Callable[[], Constraint]:
        """The engine constraint factory for this format on the model's vocabulary. The first call for a model
        builds its token table (about a second), so it runs in a worker thread. A schema that cannot be used is
        an InvalidParameterError (400)."""
        m = lm.model
        grammar = await anyio.to_thread.run_sync(json_grammar, m.tokenizer, m.config.n_vocab, self.schema)
        return grammar.new_constraint


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def valid_header(texts: list[str]) -> dict[str, str]:
    return {JSON_VALID_HEADER: str(all(parses(t) for t in texts)).lower()}


__all__ = ["JSONFormat", "JSON_INSTRUCTION", "JSON_VALID_HEADER", "parses", "valid_header"]

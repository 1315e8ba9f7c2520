"""Grammar-constrained JSON through the official clients on the real SmolLM2: Ollama `format` ("json" and a
schema) and OpenAI `response_format` (json_object and json_schema), greedy and sampled, streamed and not.
Every answer must parse, and follow the schema (checked by the independent `jsonschema` validator)."""
from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from ember.grammar import json_acceptor as acceptor
from ember.grammar.json_schema import compile_schema
from ember.server.app import ServerConfig, start_in_thread

jsonschema = pytest.importorskip("jsonschema")

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = ["What color is the sky? Respond using JSON.", "Describe a cat in JSON.",
           "Give me a JSON object with your favourite number."]
LIMIT = 300  # tokens: a complete answer ends well before

COUNTRY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "capital": {"type": "string"},
        "population": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
        "island": {"type": "boolean"},
    },
    "required": ["name", "capital", "population", "continent"],
}


@pytest.fixture(scope="module")
def server(smollm2_path):
    srv = start_in_thread(ServerConfig(threads=1, access_log=False))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ollama_client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _object(text: str) -> dict:
    value = json.loads(text)
    assert isinstance(value, dict), text
    return value


def _complete_or_prefix(text: str, done_reason: str) -> bool:
    """A constrained answer is a complete JSON object when the model stopped, and still a prefix the JSON
    grammar accepts when num_predict cut it (a 135M model may repeat itself past LIMIT: its greedy text, not
    Ember's grammar, decides that). Returns whether it ended."""
    if done_reason == "stop":
        _object(text)
        return True
    assert done_reason == "length", done_reason
    assert acceptor.feed_bytes(acceptor.initial(compile_schema({"type": "object"})), text.encode()) is not None, text
    return False


def test_ollama_format_json_greedy(ollama_client):
    ended = []
    for prompt in PROMPTS:
        r = ollama_client.generate(model="smollm2", prompt=prompt, format="json",
                                   options={"temperature": 0, "num_predict": LIMIT})
        ended.append(_complete_or_prefix(r.response, r.done_reason))
        parts = list(ollama_client.chat(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                        format="json", options={"temperature": 0, "num_predict": LIMIT},
                                        stream=True))
        ended.append(_complete_or_prefix("".join(p.message.content for p in parts), parts[-1].done_reason))
    assert sum(ended) >= len(ended) // 2 + 1, ended  # most greedy answers end well before LIMIT


@pytest.mark.parametrize("country", ["France", "Japan"])
def test_ollama_format_schema_greedy(ollama_client, country):
    r = ollama_client.chat(model="smollm2", messages=[{"role": "user", "content": f"Tell me about {country}."}],
                           format=COUNTRY, options={"temperature": 0, "num_predict": LIMIT})
    assert r.done_reason == "stop", r.message.content
    jsonschema.validate(_object(r.message.content), COUNTRY)


def test_sampled_json_in_both_dialects(ollama_client, openai_client):
    """Sampled answers: a 135M model sometimes wanders on (an ever longer string, ever deeper nesting) until
    the token limit, which no grammar can prevent; every answer that ends must parse and follow the schema,
    and most must end."""
    runs: list[tuple[bool, str, dict | None]] = []
    for seed in (1, 2, 3):
        sampling = {"temperature": 0.6, "top_k": 10, "seed": seed}
        r = ollama_client.generate(model="smollm2", prompt=PROMPTS[seed % 3], format="json",
                                   options={**sampling, "num_predict": LIMIT})
        runs.append((r.done_reason == "stop", r.response, None))
        r = ollama_client.chat(model="smollm2", messages=[{"role": "user", "content": "Tell me about Spain."}],
                               format=COUNTRY, options={**sampling, "num_predict": LIMIT})
        runs.append((r.done_reason == "stop", r.message.content, COUNTRY))
        c = openai_client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": PROMPTS[(seed + 1) % 3]}], max_tokens=LIMIT,
            response_format={"type": "json_object"}, temperature=0.6, seed=seed)
        runs.append((c.choices[0].finish_reason == "stop", c.choices[0].message.content, None))
    for ended, text, schema in runs:
        if ended:
            value = _object(text)
            if schema is not None:
                jsonschema.validate(value, schema)
    assert sum(ended for ended, _, _ in runs) >= len(runs) // 2 + 1, [text[-80:] for _, text, _ in runs]


def test_openai_json_object(openai_client):
    ended = []
    for prompt in PROMPTS:
        r = openai_client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=LIMIT,
            response_format={"type": "json_object"}, temperature=0)
        ended.append(_complete_or_prefix(r.choices[0].message.content, r.choices[0].finish_reason))
    assert sum(ended) >= len(ended) // 2 + 1, ended


def test_openai_json_schema_streamed_and_n(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "country", "schema": COUNTRY, "strict": True}}
    messages = [{"role": "user", "content": "Tell me about Italy."}]
    r = openai_client.chat.completions.create(model="smollm2", messages=messages, max_tokens=LIMIT,
                                              response_format=fmt, n=2, temperature=0.6, seed=3)
    assert len(r.choices) == 2
    for choice in r.choices:
        if choice.finish_reason == "stop":  # sampled: see test_sampled_json_in_both_dialects
            jsonschema.validate(_object(choice.message.content), COUNTRY)
    chunks = list(openai_client.chat.completions.create(model="smollm2", messages=messages, max_tokens=LIMIT,
                                                        response_format=fmt, temperature=0, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(_object(text), COUNTRY)


def test_json_errors_and_validity_header(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/api/generate", json={"model": "smollm2", "prompt": "Say hi in JSON", "format": "json",
                                             "stream": False, "options": {"temperature": 0, "num_predict": LIMIT}})
        assert r.status_code == 200 and r.headers["x-ember-json-valid"] == "true"
        # Cut short by num_predict: the text cannot be complete, and the header says so.
        r = http.post("/api/generate", json={"model": "smollm2", "prompt": "Say hi in JSON", "format": "json",
                                             "stream": False, "options": {"temperature": 0, "num_predict": 3}})
        assert r.json()["done_reason"] == "length" and r.headers["x-ember-json-valid"] == "false"
        r = http.post("/api/chat", json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                         "format": {"$ref": "http://example.com/schema.json"}})
        assert r.status_code == 400 and "only local references" in r.json()["error"]
        r = http.post("/v1/chat/completions", json={
            "model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

"""`ember serve`'s Ollama API, driven by the official `ollama` client and checked on the wire with httpx.

One server (uvicorn in a thread, free loopback port) for the module, SmolLM2 with threads=1, short outputs.
"""
from __future__ import annotations

import json
import math

import httpx
import ollama
import pytest

from ember.server.app import ServerConfig, start_in_thread
from ember.server.models import ModelSpec
from server_helpers import HERMES_TOOLS, WEATHER_TOOL

pytestmark = [pytest.mark.model, pytest.mark.slow]

GREEDY = {"temperature": 0, "num_predict": 6}

@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(threads=1, access_log=False,
                          models={"smollm2-tools": ModelSpec("smollm2", template=HERMES_TOOLS)})
    srv = start_in_thread(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_liveness_and_version(http):
    r = http.get("/")
    assert r.status_code == 200 and r.text == "Ember is running"
    head = http.head("/")
    assert head.status_code == 200 and head.content == b""
    assert http.get("/api/version").json()["version"] == __import__("ember").__version__
    assert http.get("/health").json()["status"] == "ok"


def test_generate_streamed_equals_unstreamed(client):
    full = client.generate(model="smollm2", prompt="Why is the sky blue?", options=GREEDY, stream=False)
    assert full.done and full.done_reason == "length"
    assert full.eval_count == 6 and full.prompt_eval_count > 10
    assert full.total_duration >= full.eval_duration > 0 and full.prompt_eval_duration > 0
    assert full.response.strip()
    assert full.context and all(isinstance(t, int) for t in full.context)
    assert len(full.context) == full.prompt_eval_count + full.eval_count

    parts = list(client.generate(model="smollm2", prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.response for p in parts) == full.response  # greedy: same tokens either way
    assert parts[-1].eval_count == 6 and parts[-1].context == full.context


def test_generate_wire_format_is_ndjson(http):
    body = {"model": "smollm2", "prompt": "Hello", "options": GREEDY}
    with http.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        raw = b"".join(r.iter_bytes())
    lines = raw.split(b"\n")
    assert lines[-1] == b""  # every object ends with a newline
    objs = [json.loads(line) for line in lines[:-1]]
    assert all(o["model"] == "smollm2" and o["created_at"].endswith("Z") for o in objs)
    assert all(o["done"] is False for o in objs[:-1])
    final = objs[-1]
    assert final["done"] is True and final["response"] == "" and final["done_reason"] == "length"
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(final[key], int), key
    assert final["eval_count"] == len([o for o in objs[:-1] if o["response"]]) == 6


def test_generate_system_raw_and_context(client):
    a = client.generate(model="smollm2", prompt="Who are you?", system="You are a pirate.", options=GREEDY)
    b = client.generate(model="smollm2", prompt="Who are you?", options=GREEDY)
    assert a.prompt_eval_count != b.prompt_eval_count  # the system prompt replaced the default one
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.prompt_eval_count < 10 and not raw.context  # no template, and raw mode returns no context
    follow = client.generate(model="smollm2", prompt="And of Italy?", context=b.context, options=GREEDY)
    assert follow.prompt_eval_count > len(b.context)  # the conversation so far came first


def test_chat_streamed_and_options(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    full = client.chat(model="smollm2", messages=messages, options=GREEDY)
    assert full.message.role == "assistant" and full.message.content
    parts = list(client.chat(model="smollm2", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 6

    first_word = full.message.content.split()[0]
    stopped = client.chat(model="smollm2", messages=messages, options={**GREEDY, "stop": [first_word]})
    assert first_word not in stopped.message.content and stopped.done_reason == "stop"

    seeded = {"temperature": 1.0, "seed": 1234, "num_predict": 8}
    one = client.chat(model="smollm2", messages=messages, options=seeded).message.content
    two = client.chat(model="smollm2", messages=messages, options=seeded).message.content
    assert one == two


def test_logprobs(client):
    r = client.generate(model="smollm2", prompt="The capital of France is", raw=True, logprobs=True,
                        top_logprobs=3, options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 4})
    assert len(r.logprobs) == 4
    assert "".join(lp.token for lp in r.logprobs) == r.response
    for lp in r.logprobs:
        tops = [t.logprob for t in lp.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert lp.token == lp.top_logprobs[0].token and math.isclose(lp.logprob, tops[0])  # greedy = top-1
    assert math.fsum(math.exp(t.logprob) for t in r.logprobs[0].top_logprobs) <= 1.0 + 1e-6


def test_format_json(client, http):
    r = client.generate(model="smollm2", prompt="What color is the sky? Respond using JSON", format="json",
                        options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(r.response), dict) and r.done_reason == "stop"
    raw = http.post("/api/generate", json={"model": "smollm2", "prompt": "What color is the sky? Respond using JSON",
                                           "format": "json", "stream": False,
                                           "options": {"temperature": 0, "num_predict": 60}})
    assert raw.headers["x-ember-json-valid"] == "true"


def test_list_show_ps(client):
    names = [m.model for m in client.list().models]
    assert "smollm2:latest" in names and "smollm2-tools:latest" in names
    entry = next(m for m in client.list().models if m.model == "smollm2:latest")
    assert entry.size > 90_000_000 and entry.details.family == "llama" and entry.details.quantization_level == "Q4_1"
    assert len(entry.digest) == 64

    show = client.show("smollm2")
    assert show.details.family == "llama" and show.details.format == "gguf"
    assert show.modelinfo["llama.context_length"] == 8192 and show.modelinfo["tokenizer.ggml.tokens"] == []
    assert "<|im_start|>" in show.template and "tools" not in show.capabilities
    assert "tools" in client.show("smollm2-tools").capabilities

    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert "smollm2:latest" in running
    assert running["smollm2:latest"].size > 90_000_000 and running["smollm2:latest"].context_length == 4096
    assert running["smollm2:latest"].expires_at is not None


def test_embed_and_embeddings(client):
    r = client.embed(model="smollm2", input=["The cat sat on the mat.", "A cat was sitting on a mat.",
                                              "Stock markets fell sharply on Tuesday."])
    a, b, c = r.embeddings
    assert len(a) == 576 and r.prompt_eval_count > 10
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4) for v in (a, b, c))
    cos = lambda u, v: math.fsum(x * y for x, y in zip(u, v))  # noqa: E731 (unit vectors)
    assert cos(a, b) > cos(a, c)  # paraphrases closer than unrelated text
    legacy = client.embeddings(model="smollm2", prompt="The cat sat on the mat.").embedding
    assert max(abs(x - y) for x, y in zip(legacy, a)) < 1e-5
    short = client.embed(model="smollm2", input="The cat sat on the mat.", dimensions=32).embeddings[0]
    assert len(short) == 32 and math.isclose(math.fsum(x * x for x in short), 1.0, rel_tol=1e-4)


def test_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat(model="smollm2-tools", messages=messages, tools=[WEATHER_TOOL], options={"temperature": 0})
    assert r.message.content == ""
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Paris"}

    parts = list(client.chat(model="smollm2-tools", messages=messages, tools=[WEATHER_TOOL],
                             options={"temperature": 0}, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(p.message.content for p in parts) == ""  # the call's text is not echoed as content

    with pytest.raises(ollama.ResponseError) as e:  # SmolLM2's own template has no tools
        client.chat(model="smollm2", messages=messages, tools=[WEATHER_TOOL])
    assert e.value.status_code == 400 and "does not support tools" in e.value.error


def test_errors(client, http):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="no-such-model", prompt="hi")
    assert e.value.status_code == 404 and "not found" in e.value.error

    r = http.post("/api/generate", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = http.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]

    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="smollm2", prompt="hello " * 5000, options={"num_predict": 1})
    assert e.value.status_code == 400 and "context window" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # streamed too: the status comes before any line
        list(client.generate(model="smollm2", prompt="hello " * 5000, stream=True))
    assert e.value.status_code == 400

    for bad in ({"temperature": "hot"}, {"top_p": 5}, {"num_predict": 1.5}, {"nonsense": 1}):
        r = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", "stream": False, "options": bad})
        assert r.status_code == 400 and r.json()["error"], bad
    r = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", "format": "yaml"})
    assert r.status_code == 400
    assert http.get("/api/nope").status_code == 404


def test_load_and_unload_with_empty_prompt(client):
    loaded = client.generate(model="smollm2-tools")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert "smollm2-tools:latest" in [m.model for m in client.ps().models]
    gone = client.chat(model="smollm2-tools", messages=[], keep_alive=0)
    assert gone.done_reason == "unload"
    assert "smollm2-tools:latest" not in [m.model for m in client.ps().models]

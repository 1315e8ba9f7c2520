"""`ember serve`'s OpenAI API (/v1), driven by the official `openai` client and checked on the wire with httpx."""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from ember.server.app import ServerConfig, start_in_thread
from ember.server.models import ModelSpec
from server_helpers import HERMES_TOOLS, WEATHER_TOOL

pytestmark = [pytest.mark.model, pytest.mark.slow]


HI = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(threads=1, access_log=False,
                          models={"smollm2-tools": ModelSpec("smollm2", template=HERMES_TOOLS)})
    srv = start_in_thread(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def tokenizer(server):
    """The served model's own tokenizer (the server runs in this process)."""
    manager = server.app.state.manager
    return manager.loaded["smollm2:latest"].model


def test_chat_completion_and_stream(client):
    full = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == "smollm2"
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + 6

    chunks = list(client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streamed and not agree
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format(http):
    body = {"model": "smollm2", "messages": HI, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in payloads)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_completions(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                  temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(c.logprobs.tokens) == 5 and "".join(c.logprobs.tokens) == c.text
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset[1] == len(c.logprobs.tokens[0])

    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == c.text
    echoed = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + c.text
    two = client.completions.create(model="smollm2", prompt=["One, two,", "Red, green,"], max_tokens=2,
                                    temperature=0)
    assert [ch.index for ch in two.choices] == [0, 1] and two.usage.completion_tokens == 4


def test_chat_logprobs_n_seed_and_stop(client, server):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token

    many = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=5, n=2, seed=7,
                                          temperature=1.0)
    assert [c.index for c in many.choices] == [0, 1] and many.usage.completion_tokens <= 10
    again = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=5, n=2, seed=7,
                                           temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in many.choices]

    first = r.choices[0].message.content.split()[0]
    stopped = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=6, temperature=0,
                                             stop=[first])
    assert first not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"

    # logit_bias -100 bans the greedy first token: the answer must start differently.
    first_id = tokenizer(server).tokenize(content[0].token, add_special=False)[0]
    banned = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=2, temperature=0,
                                            logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != content[0].token


def test_response_format_json(client):
    r = client.chat.completions.create(model="smollm2", max_tokens=60, temperature=0,
                                       messages=[{"role": "user", "content": "What color is the sky? Respond using JSON"}],
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"


def test_embeddings(client):
    r = client.embeddings.create(model="smollm2", input=["The cat sat on the mat.", "Stock markets fell."])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 576  # base64 on the wire
    assert math.isclose(math.fsum(x * x for x in r.data[0].embedding), 1.0, rel_tol=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 5
    floats = client.embeddings.create(model="smollm2", input="The cat sat on the mat.", encoding_format="float")
    assert max(abs(x - y) for x, y in zip(floats.data[0].embedding, r.data[0].embedding)) < 1e-6
    short = client.embeddings.create(model="smollm2", input="The cat sat on the mat.", dimensions=64)
    assert len(short.data[0].embedding) == 64


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "smollm2:latest" in ids and "smollm2-tools:latest" in ids
    m = client.models.retrieve("smollm2")
    assert m.id == "smollm2" and m.object == "model" and m.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="smollm2-tools", messages=messages, tools=[WEATHER_TOOL],
                                       temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="smollm2-tools", messages=messages, tools=[WEATHER_TOOL],
                                                 temperature=0, max_tokens=40, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The tool's answer goes back in; the assistant turn's arguments arrive as a JSON string.
    follow = client.chat.completions.create(model="smollm2-tools", temperature=0, max_tokens=5, tools=[WEATHER_TOOL],
                                            messages=messages + [choice.message.model_dump(exclude_none=True),
                                                                 {"role": "tool", "tool_call_id": call.id,
                                                                  "content": "18 C and sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="smollm2-tools", messages=messages, tools=[WEATHER_TOOL],
                                          tool_choice="none", temperature=0, max_tokens=5)
    assert none.choices[0].message.tool_calls is None


def test_errors(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello " * 5000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # streamed: still a status, not an event
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello " * 5000}],
                                       stream=True)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=HI, temperature=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=HI, logit_bias={"999999": 5}, max_tokens=1)

    r = http.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "model" and "model" in err["message"]
    r = http.post("/v1/completions", content=b'{"model": "smollm2", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}

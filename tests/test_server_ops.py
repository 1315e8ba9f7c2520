"""`ember serve` operations: model manager (keep_alive, LRU, memory budget, queue bound, disconnects), metrics,
API keys, CORS, body limit, access log, the CLI's serve/ps/stop/run, and the pure parsers."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Iterator

import httpx
import ollama
import openai
import pytest

from ember.cli.main import main
from ember.errors import InvalidParameterError
from ember.server import base_url, parse_host
from ember.server.app import ServerConfig, create_app, parse_bytes, start_in_thread
from ember.server.models import ModelSpec, parse_keep_alive
from ember.server.tool_calls import ToolCall, ToolCallParser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


# -- pure parsers (no model) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("10", 10.0), (0, 0.0), ("0", 0.0), (2.5, 2.5),
    ("-1", None), (-1, None), ("-5m", None), ("1.5s", 1.5),
])
def test_parse_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", True, [1], "1x", float("inf")])
def test_parse_keep_alive_rejects(value):
    with pytest.raises(InvalidParameterError):
        parse_keep_alive(value)


def test_parse_host_and_sizes():
    assert parse_host(None) == ("127.0.0.1", 11434)
    assert parse_host("0.0.0.0") == ("0.0.0.0", 11434)
    assert parse_host(":8080") == ("127.0.0.1", 8080)
    assert parse_host("http://example.local:1234/") == ("example.local", 1234)
    assert parse_host("[::1]:99") == ("::1", 99)
    assert base_url("0.0.0.0:5000") == "http://127.0.0.1:5000"
    with pytest.raises(InvalidParameterError):
        parse_host("host:notaport")
    assert parse_bytes("32M") == 32 << 20 and parse_bytes("1024") == 1024 and parse_bytes("2GiB") == 2 << 30


def _run_parser(chunks: list[str], tools=TOOLS) -> tuple[str, list[ToolCall]]:
    p = ToolCallParser(tools)
    text, calls = [], []
    for c in chunks:
        t, k = p.push(c)
        text.append(t)
        calls += k
    t, k = p.finish()
    return "".join(text) + t, calls + k


def test_tool_call_parser():
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for size in (1, 3, 7, len(hermes)):  # however the text is split into tokens
        text, calls = _run_parser([hermes[i:i + size] for i in range(0, len(hermes), size)])
        assert text == "" and calls == [ToolCall("get_weather", {"city": "Paris"})]
    text, calls = _run_parser(["Let me check. <tool", '_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'])
    assert text == "Let me check. " and calls == [ToolCall("f", {"x": 1})]
    assert _run_parser(['{"name": "get_weather", "parameters": {"city": "Rome"}}'])[1] == [
        ToolCall("get_weather", {"city": "Rome"})]
    assert _run_parser(['[{"name": "get_weather", "arguments": {}}, {"name": "get_weather", "arguments": {}}]'])[1] \
        == [ToolCall("get_weather", {})] * 2
    assert _run_parser(['{"name": "other", "arguments": {}}']) == ('{"name": "other", "arguments": {}}', [])
    assert _run_parser(["I like <tools> and <tool_calls>"]) == ("I like <tools> and <tool_calls>", [])
    assert _run_parser(['<tool_call>{"name": "f", "arguments": {}}'])[1] == [ToolCall("f", {})]  # no close tag
    assert _run_parser(["<tool_call>not json</tool_call>"]) == ("<tool_call>not json</tool_call>", [])


# -- a server with tight limits -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(threads=1, max_loaded=1, max_queue=1, access_log=True,
                          models={"smollm2-b": ModelSpec("smollm2", system="You are terse.")})
    srv = start_in_thread(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def _busy(server, http, model: str = "smollm2") -> Iterator[None]:
    """Hold one request on `model` running (streaming, end-of-generation tokens banned) inside the block."""
    http.post("/api/generate", json={"model": model})  # loaded, so its tokenizer is at hand
    tokenizer = server.app.state.manager.loaded[f"{model}:latest"].model.tokenizer
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True,
            "logit_bias": {str(t): -100 for t in tokenizer.eog_ids}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: a collected iterator would close the response early
        first = next(lines)  # admitted and generating
        assert first.startswith("data: {") and "error" not in first, first
        yield
        del lines


def _metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.model
def test_metrics_count_tokens_and_latency(http):
    model = 'model="smollm2:latest"'
    http.post("/api/generate", json={"model": "smollm2"})  # loaded, so the measured request starts clean
    before = _metrics(http)
    r = http.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                         "options": {"num_predict": 5, "temperature": 0}}).json()
    after = _metrics(http)
    delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert delta(f"ember_generated_tokens_total{{{model}}}") == r["eval_count"] == 5
    assert delta(f"ember_prompt_tokens_total{{{model}}}") == r["prompt_eval_count"]
    assert delta(f"ember_time_to_first_token_seconds_count{{{model}}}") == 1
    assert delta(f"ember_inter_token_latency_seconds_count{{{model}}}") == 4
    assert delta('ember_requests_total{endpoint="/api/generate",status="200"}') == 1
    assert after[f'ember_time_to_first_token_seconds_bucket{{{model},le="+Inf"}}'] \
        == after[f"ember_time_to_first_token_seconds_count{{{model}}}"]
    assert after["ember_loaded_models"] == 1 and after["ember_in_flight_requests"] == 0
    assert after[f"ember_running_sequences{{{model}}}"] == 0 and f"ember_queue_depth{{{model}}}" in after
    assert 0 <= after[f"ember_kv_cache_usage_ratio{{{model}}}"] <= 1
    http.get("/no/such/path")
    assert _metrics(http)['ember_requests_total{endpoint="other",status="404"}'] >= 1


@pytest.mark.model
def test_access_log_lines_are_json(http):
    # A handler on the logger itself: `ember serve` run in-process by another test turns propagation off.
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    log = logging.getLogger("ember.access")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        http.get("/api/version")
        # The line is written after the response is sent, on the server's thread: wait for it.
        _wait(lambda: any(json.loads(r.getMessage())["path"] == "/api/version" for r in seen), 5)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    records = [json.loads(r.getMessage()) for r in seen]
    assert records and records[-1]["path"] == "/api/version" and records[-1]["status"] == 200
    assert records[-1]["method"] == "GET" and records[-1]["duration_ms"] >= 0 and records[-1]["time"].endswith("Z")


@pytest.mark.model
def test_disconnect_aborts_and_frees_kv(server, http):
    with _busy(server, http):
        engine = server.app.state.manager.loaded["smollm2:latest"].model.engine
        assert engine.stats().num_running == 1
    # Leaving the block closed the connection: the request is aborted and its blocks freed, long before 2000.
    assert _wait(lambda: engine.stats().num_running == 0, 5)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and server.app.state.manager.in_flight == 0

    steps = engine.stats().num_steps
    eog = {str(t): -100 for t in server.app.state.manager.loaded["smollm2:latest"].model.tokenizer.eog_ids}
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        http.post("/v1/completions", json={"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000,
                                           "logit_bias": eog}, timeout=1.0)
    assert _wait(lambda: engine.stats().num_running == 0 and server.app.state.manager.in_flight == 0, 5)
    assert engine.stats().num_steps - steps < 200  # stopped soon after the client left


@pytest.mark.model
def test_queue_bound_is_503(server, http):
    with _busy(server, http):  # max_queue=1: the one slot is taken
        busy = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", "stream": False})
        assert busy.status_code == 503 and "maximum pending requests" in busy.json()["error"]
        oa = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}]})
        assert oa.status_code == 503 and oa.json()["error"]["type"] == "server_error"
    assert _wait(lambda: server.app.state.manager.in_flight == 0, 5)


@pytest.mark.model
def test_lru_eviction_and_busy_models(server, http):
    client = ollama.Client(host=server.url)
    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1})
    assert [m.model for m in client.ps().models] == ["smollm2:latest"]
    r = client.generate(model="smollm2-b", prompt="hi", options={"num_predict": 1})
    assert r.load_duration > 0
    assert [m.model for m in client.ps().models] == ["smollm2-b:latest"]  # max_loaded=1: the LRU one went

    manager = server.app.state.manager
    manager.config.max_queue = 2  # room for a second request, so the refusal below is about memory slots
    try:
        with _busy(server, http, "smollm2-b"):
            busy = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", "stream": False})
            assert busy.status_code == 503 and "in use" in busy.json()["error"]
    finally:
        manager.config.max_queue = 1
    assert _wait(lambda: manager.in_flight == 0, 5)


@pytest.mark.model
def test_keep_alive_expiry(server):
    client = ollama.Client(host=server.url)
    client.generate(model="smollm2", prompt="hi", keep_alive="1s", options={"num_predict": 1})
    (m,) = client.ps().models
    assert m.model == "smollm2:latest" and m.expires_at.timestamp() - time.time() < 2
    assert _wait(lambda: not client.ps().models, 6)
    client.generate(model="smollm2", prompt="hi", keep_alive=-1, options={"num_predict": 1})
    assert client.ps().models[0].expires_at.year > 2200  # forever


@pytest.mark.model
def test_num_ctx_reloads_an_idle_model(server):
    client = ollama.Client(host=server.url)
    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1, "num_ctx": 256})
    assert client.ps().models[0].context_length == 256
    with pytest.raises(ollama.ResponseError) as e:  # the smaller window is enforced, not truncated into
        client.generate(model="smollm2", prompt="hello " * 300, options={"num_predict": 1, "num_ctx": 256})
    assert e.value.status_code == 400 and "256 tokens" in e.value.error
    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1})  # no num_ctx: keeps what is loaded
    assert client.ps().models[0].context_length == 256
    client.generate(model="smollm2", prompt="hi", options={"num_predict": 1, "num_ctx": 4096})
    assert client.ps().models[0].context_length == 4096


@pytest.mark.model
def test_cli_ps_stop_and_run_through_server(server, http, monkeypatch, capsys):
    monkeypatch.setenv("EMBER_HOST", server.url)
    http.post("/api/generate", json={"model": "smollm2"})
    assert main(["ps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert out[1].startswith("smollm2:latest") and "100% CPU" in out[1] and "4096" in out[1]

    chats = lambda: _metrics(http).get('ember_requests_total{endpoint="/api/chat",status="200"}', 0)  # noqa: E731
    before = chats()
    assert main(["run", "smollm2", "Say hi", "-n", "4", "--temperature", "0"]) == 0
    answer = capsys.readouterr().out
    assert answer.strip() and chats() - before == 2  # the load probe and the answer went to the server
    direct = ollama.Client(host=server.url).chat(model="smollm2", messages=[{"role": "user", "content": "Say hi"}],
                                                 options={"num_predict": 4, "temperature": 0})
    assert answer.strip() == direct.message.content.strip()

    assert main(["stop", "smollm2"]) == 0
    assert _wait(lambda: not server.app.state.manager.loaded, 5)
    assert main(["stop", "smollm2"]) == 1
    assert "couldn't find model" in capsys.readouterr().err


def test_cli_without_server(monkeypatch, capsys, unused_port):
    monkeypatch.setenv("EMBER_HOST", f"127.0.0.1:{unused_port}")
    assert main(["ps"]) == 1
    assert "is `ember serve` running?" in capsys.readouterr().err


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_a_busy_port(monkeypatch, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        monkeypatch.setenv("EMBER_HOST", "127.0.0.1:%d" % s.getsockname()[1])
        assert main(["serve"]) == 1
    assert "cannot listen on" in capsys.readouterr().err


# -- keys, CORS, body size, memory budget (no model loaded) -----------------------------------------------------------
@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("# team keys\nfile-key\n")
    env = {"EMBER_API_KEYS": "env-key, other-key", "EMBER_API_KEY_FILE": str(key_file),
           "EMBER_ORIGINS": "https://app.example.com", "EMBER_MAX_REQUEST_BYTES": "1K",
           "EMBER_MAX_MEMORY": "50M", "EMBER_NUM_THREADS": "1"}
    srv = start_in_thread(ServerConfig.from_env(env, access_log=False))
    yield srv
    srv.stop()


def test_api_keys(locked):
    url = locked.url
    assert httpx.get(url + "/").text == "Ember is running"  # liveness stays public
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/api/version").status_code == 200
    r = httpx.get(url + "/api/tags")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/metrics").status_code == 401
    for key in ("env-key", "other-key", "file-key"):
        assert httpx.get(url + "/api/tags", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(url + "/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/api/tags", headers={"Authorization": "Basic env-key"}).status_code == 401

    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key"
    ids = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0).models.list()]
    assert isinstance(ids, list)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=url).list()
    assert e.value.status_code == 401
    assert isinstance(ollama.Client(host=url, headers={"Authorization": "Bearer file-key"}).list().models, list)


def test_cors(locked):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(locked.url + "/api/chat", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    for origin in ("http://localhost:3000", "http://127.0.0.1", "https://app.example.com"):
        r = preflight(origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, origin
    r = preflight("https://evil.example.net")
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(locked.url + "/", headers={"Origin": "http://localhost:5173"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_request_size_limit(locked):
    auth = {"Authorization": "Bearer env-key"}
    big = {"model": "smollm2", "prompt": "x" * 2000}
    r = httpx.post(locked.url + "/api/generate", json=big, headers=auth)
    assert r.status_code == 413 and "larger than 1024 bytes" in r.json()["error"]

    def chunked():  # no Content-Length: counted while reading
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(40):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(locked.url + "/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.model
def test_memory_budget(locked, smollm2_path):
    r = httpx.post(locked.url + "/api/generate", json={"model": "smollm2", "prompt": "hi"},
                   headers={"Authorization": "Bearer env-key"}, timeout=60)
    assert r.status_code == 500 and "memory budget" in r.json()["error"] and "EMBER_MAX_MEMORY" in r.json()["error"]


def test_routes_table():
    app = create_app(ServerConfig(access_log=False))
    paths = {route.path for route in app.routes}
    assert {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/tags", "/api/ps", "/api/show",
            "/api/version", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
            "/v1/models/{model:path}", "/", "/health", "/metrics"} <= paths

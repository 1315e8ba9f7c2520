"""The server's store endpoints (/api/create, copy, delete, blobs, pull, push), driven by the official `ollama`
client and checked on the wire with httpx.

One server (uvicorn in a thread) for the module over a temporary EMBER_HOME; models are tiny random GGUFs
(tests/tiny_models.py) uploaded as blobs, as Ollama's clients do. Pull and push go through the real registry
of tests/registry_fixture.py (skipped where it cannot be installed, as the registry tests are).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama
import pytest

from ember.server.app import ServerConfig, start_in_thread
from registry_fixture import Registry, registry  # noqa: F401  (registry is a fixture)
from tiny_models import write_tiny_model

# A Jinja chat template (Ember's template language), short enough to compare verbatim.
TEMPLATE = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
SYSTEM = "You are tiny."


def listing(home: Path) -> dict[str, str]:
    """Every file in the store (but locks/) -> sha256: "the store is untouched" compares two of these."""
    return {p.relative_to(home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file() and "locks" not in p.relative_to(home).parts}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("ember-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_HOME", str(path))
        for var in ("EMBER_MODELS", "EMBER_REGISTRY", "EMBER_REGISTRY_USERNAME", "EMBER_REGISTRY_PASSWORD"):
            mp.delenv(var, raising=False)
        yield path


@pytest.fixture(scope="module")
def server(home):
    srv = start_in_thread(ServerConfig(threads=1, access_log=False))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_model(path, seed=7)
    return path


@pytest.fixture(scope="module")
def tiny(client, gguf) -> str:
    """`tiny:latest`, created through the API from an uploaded blob; returns the blob digest."""
    digest = client.create_blob(gguf)
    done = client.create(model="tiny", files={"tiny.gguf": digest}, system=SYSTEM, template=TEMPLATE,
                         parameters={"temperature": 0.25, "stop": ["<end>"]}, stream=False)
    assert done.status == "success"
    return digest


def names(client: ollama.Client) -> set[str]:
    return {m.model for m in client.list().models}


def system_of(http: httpx.Client, name: str) -> str:
    # The client's ShowResponse (0.6) drops `system`; the wire has it, and the Modelfile repeats it.
    return http.post("/api/show", json={"model": name}).json()["system"]


def status_of(call: Any) -> int:
    with pytest.raises(ollama.ResponseError) as info:
        call()
    return info.value.status_code


# -- create, list, show, copy, delete ---------------------------------------------------------------------------
def test_create_from_uploaded_blob_then_list_and_show(client, http, tiny):
    assert http.head(f"/api/blobs/{tiny}").status_code == 200
    assert "tiny:latest" in names(client)
    shown = client.show("tiny")
    assert f'SYSTEM "{SYSTEM}"' in (shown.modelfile or "") or SYSTEM in (shown.modelfile or "")
    assert system_of(http, "tiny") == SYSTEM
    assert shown.template == TEMPLATE
    assert "temperature" in (shown.parameters or "") and "<end>" in (shown.parameters or "")
    assert shown.details.family == "llama"


def test_create_streams_ollama_progress(client, http, tiny):
    events = list(client.create(model="tiny-stream", from_="tiny", system="Another system.", stream=True))
    statuses = [e.status for e in events]
    assert statuses[-1] == "success"
    assert f"using existing layer {tiny}" in statuses  # the weights are shared with the base, not copied
    assert "writing manifest" in statuses
    assert system_of(http, "tiny-stream") == "Another system."
    client.delete("tiny-stream")


def test_legacy_modelfile_form(http, tiny):
    r = http.post("/api/create", json={"model": "tiny-legacy", "stream": False,
                                       "modelfile": f"FROM {tiny}\nSYSTEM legacy\nPARAMETER top_k 5\n"})
    assert r.status_code == 200 and r.json() == {"status": "success"}
    assert http.post("/api/show", json={"model": "tiny-legacy"}).json()["system"] == "legacy"
    assert http.request("DELETE", "/api/delete", json={"model": "tiny-legacy"}).status_code == 200


def test_copy_then_delete(client, http, tiny):
    r = http.post("/api/copy", json={"source": "tiny", "destination": "tiny-copy:v2"})
    assert r.status_code == 200 and r.content == b""
    assert {"tiny:latest", "tiny-copy:v2"} <= names(client)
    assert system_of(http, "tiny-copy:v2") == SYSTEM
    r = http.request("DELETE", "/api/delete", json={"model": "tiny-copy:v2"})
    assert r.status_code == 200 and r.content == b""
    assert "tiny-copy:v2" not in names(client)
    assert http.head(f"/api/blobs/{tiny}").status_code == 200  # still used by tiny:latest
    assert status_of(lambda: client.show("tiny-copy:v2")) == 404


def test_deleting_a_loaded_model_unloads_it(client, tiny):
    client.copy("tiny", "tiny-loaded")
    client.generate(model="tiny-loaded", prompt="hello", options={"num_predict": 1, "temperature": 0})
    assert "tiny-loaded:latest" in {m.model for m in client.ps().models}
    client.delete("tiny-loaded")
    assert "tiny-loaded:latest" not in {m.model for m in client.ps().models}


# -- blobs ------------------------------------------------------------------------------------------------------
def test_blob_upload_statuses(http, home):
    data = b"some bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + "0" * 64
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    before = listing(home)
    r = http.post(f"/api/blobs/{wrong}", content=data)
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert listing(home) == before  # nothing kept
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200  # already there
    assert http.post("/api/blobs/sha256:xyz", content=data).status_code == 400
    assert http.head("/api/blobs/sha256:xyz").status_code == 400


def test_blob_uploads_are_not_bound_by_the_request_size_limit(home):
    srv = start_in_thread(ServerConfig(threads=1, access_log=False, max_request_bytes=1024))
    try:
        data = b"w" * 4096  # weights are gigabytes; the limit is for JSON bodies
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert httpx.post(f"{srv.url}/api/blobs/{digest}", content=data).status_code == 201
        r = httpx.post(f"{srv.url}/api/create", json={"model": "x", "from": "tiny", "system": "s" * 2000})
        assert r.status_code == 413
    finally:
        srv.stop()


# -- errors -----------------------------------------------------------------------------------------------------
def test_error_statuses(client, http, home, tiny):
    assert status_of(lambda: client.delete("nope")) == 404
    assert status_of(lambda: client.copy("nope", "other")) == 404
    assert status_of(lambda: client.create(model="x", stream=False)) == 400  # neither from nor files
    assert status_of(lambda: client.create(model="x", from_="/etc/passwd")) == 400  # no server-side paths
    assert status_of(lambda: client.create(model="x", files={"a.gguf": "sha256:" + "1" * 64})) == 404
    assert status_of(lambda: client.create(model="x", from_="tiny", parameters={"bogus": 1})) == 400
    assert status_of(lambda: client.create(model="x", from_="tiny", template="{{ .Prompt }}")) == 400
    assert status_of(lambda: client.push("nope:v1", insecure=True)) == 404
    r = http.post("/api/create", json={"model": "x", "from": "tiny", "stream": "yes"})
    assert r.status_code == 400 and "error" in r.json()
    before = listing(home)
    for bad in ("../evil", "a/../../b", "Bad Name"):
        assert status_of(lambda: client.create(model=bad, from_="tiny")) == 400
        assert status_of(lambda: client.copy("tiny", bad)) == 400
        assert status_of(lambda: client.delete(bad)) == 400
        assert status_of(lambda: client.pull(bad)) == 400
    assert status_of(lambda: client.create(model="x", from_="../evil")) == 400
    assert listing(home) == before


# -- pull and push through a real registry ----------------------------------------------------------------------
def test_push_then_pull_round_trip(client, http, registry: Registry, tiny):  # noqa: F811
    name = f"{registry.host}/alice/served:v1"
    client.copy("tiny", name)
    manifest_digest = {m.model: m.digest for m in client.list().models}[name]
    events = list(client.push(name, insecure=True, stream=True))
    assert events[0].status == "retrieving manifest" and events[-1].status == "success"
    blobs = [e for e in events if e.digest]
    assert tiny in {e.digest for e in blobs}
    assert all(e.total and e.completed is not None and e.completed <= e.total for e in blobs)
    client.delete(name)
    assert name not in names(client)
    assert client.pull(name, insecure=True, stream=False).status == "success"
    assert {m.model: m.digest for m in client.list().models}[name] == manifest_digest  # same bytes, same ID
    assert system_of(http, name) == SYSTEM
    statuses = [e.status for e in client.pull(name, insecure=True, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    client.delete(name)
    missing = f"{registry.host}/alice/missing:v1"
    assert status_of(lambda: client.pull(missing, insecure=True)) == 404
    with pytest.raises(ollama.ResponseError, match="not found"):  # streamed: an {"error"} line after progress
        list(client.pull(missing, insecure=True, stream=True))

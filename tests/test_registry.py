"""Registry tests: push and pull through a real registry (docker-registry, tests/registry_fixture.py) between
separate EMBER_HOME folders; resumable parallel downloads; and the ways a registry can hand over bad data.
(Registries that ask for credentials: test_registry_auth.py; shared helpers: registry_helpers.py.)

Broken registries are played by the real one: tests rewrite the bytes in its storage folder (a flipped byte,
a truncated blob, a manifest that is not the one its digest names) or push manifests it accepts but Ember
must not. A TCP proxy in front of it counts connections, throttles, and cuts connections mid-transfer.

"The store is as it was" compares every file under EMBER_HOME with its size and sha256, except locks/:
lock files are empty, permanent by design (deleting a lock file races with flock), and hold no data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ember.errors import EmberError, ModelNotFoundError
from ember.store import resolve_model
from ember.store.blobs import blob_path
from ember.store.manifests import MEDIA_TYPES, Manifest, manifest_path
from ember.store.names import parse_name
from ember.store.registry import (
    PARTIAL_PREFIX,
    TransferOptions,
    partial_paths,
    pull,
    push,
)
from registry_fixture import Registry, registry  # noqa: F401  (registry is a fixture)
from registry_helpers import (  # noqa: F401  (homes is a fixture)
    Homes, ember, homes, listing, make_model, make_raw_model, partial_files, push_raw_manifest, seeds)
from tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


class Proxy:
    """A TCP proxy to the registry: counts connections (and how many were open at once), can throttle the
    registry's answers per connection, and can cut every connection once `cut_after` answer bytes passed."""

    def __init__(self, target: str, *, rate: int | None = None, cut_after: int | None = None,
                 cut_once: bool = False) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.rate, self.cut_after, self.cut_once = rate, cut_after, cut_once
        self.sent = 0
        self.cut = threading.Event()
        self.cuts = 0
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.connections += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                self.open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while True:
                data = src.recv(16384 if answers else 65536)
                if not data:
                    break
                if answers and self.cut_after is not None:
                    with self.lock:
                        room = self.cut_after - self.sent
                        if room <= 0 or self.cut.is_set():
                            data = b""
                        elif len(data) > room:
                            data = data[:room]
                        self.sent += len(data)
                        if self.sent >= self.cut_after and not self.cut.is_set():
                            self._cut_all()
                    if not data:
                        break
                dst.sendall(data)
                if answers and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            if answers:
                with self.lock:
                    self.active -= 1

    def _cut_all(self) -> None:  # caller holds the lock
        self.cut.set()
        self.cuts += 1
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open.clear()
        if self.cut_once:
            self.cut_after = None
            threading.Timer(0.05, self.cut.clear).start()

    def close(self) -> None:
        self.closed = True
        self.server.close()
        with self.lock:
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def proxies():
    made: list[Proxy] = []

    def make(target: str, **kwargs) -> Proxy:
        p = Proxy(target, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def saved_progress(home: Path) -> int:
    total = 0
    for state in (home / "models" / "blobs").glob(PARTIAL_PREFIX + "*.json"):
        total += sum(done for _, _, done in json.loads(state.read_text())["parts"])
    return total


# ---- round trips ---------------------------------------------------------------------------------------------


def test_push_then_pull_round_trip_through_the_cli(registry, homes, tmp_path):
    a = homes.use("a")
    name = f"{registry.host}/alice/tiny:v1"
    gguf = tmp_path / "tiny.gguf"
    write_tiny_model(gguf, seed=1)
    (tmp_path / "Modelfile").write_text(
        "FROM ./tiny.gguf\n"
        'TEMPLATE """{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"""\n'
        'SYSTEM """You are a tiny test model.\nBe brief."""\n'
        "PARAMETER temperature 0.3\nPARAMETER num_ctx 128\nPARAMETER stop <end>\n"
        "MESSAGE user hi\nMESSAGE assistant hello\n"
    )
    r = ember("create", name, "-f", str(tmp_path / "Modelfile"), home=a)
    assert r.returncode == 0, r.stderr
    r = ember("push", name, "--insecure", home=a)
    assert r.returncode == 0, r.stderr
    assert "pushing manifest" in r.stderr and r.stderr.rstrip().endswith("success")

    b = homes.use("b")
    r = ember("pull", name, "--insecure", home=b)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "pulling manifest" and lines[-3:] == ["verifying sha256 digest", "writing manifest", "success"]

    # Same manifest bytes (so the same ID in `ember list`) and the same blobs, in two separate stores.
    rel = Path("models/manifests", *parse_name(name).parts)
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    la, lb = listing(a), listing(b)
    assert {k: v for k, v in la.items() if "/blobs/" in k} == {k: v for k, v in lb.items() if "/blobs/" in k}
    ids = [ember("list", home=h).stdout.splitlines()[1].split()[1] for h in (a, b)]
    assert ids[0] == ids[1] == hashlib.sha256((b / rel).read_bytes()).hexdigest()[:12]

    resolved = resolve_model(name)  # EMBER_HOME is b
    assert resolved.path.read_bytes() == gguf.read_bytes()
    assert resolved.system == "You are a tiny test model.\nBe brief."
    assert resolved.template.startswith("{% for m in messages %}")
    assert resolved.params == {"num_ctx": 128, "stop": ["<end>"], "temperature": 0.3}
    shown = ember("show", name, "--system", home=b)
    assert shown.stdout == "You are a tiny test model.\nBe brief.\n"


def test_pulled_model_loads_and_honours_its_parameters(registry, homes, tmp_path):
    import ember

    homes.use("a")
    name = f"{registry.host}/alice/loadable:latest"
    make_model(name, tmp_path, system="Be terse.")
    push(name, insecure=True)
    homes.use("b")
    pull(name, insecure=True)
    m = ember.load(name)
    try:
        assert m.system == "Be terse."
        assert m.defaults["temperature"] == 0.25 and m.defaults["stop"] == ["<end>", "</s>"]
        out = m.chat([{"role": "user", "content": "the cat"}], max_tokens=3, temperature=0)
        assert len(out.ids) <= 3
    finally:
        m.close()


def test_names_without_a_host_use_ember_registry(registry, homes, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_REGISTRY", registry.url)  # an explicit http:// needs no --insecure
    homes.use("a")
    make_model("alice/nohost:v2", tmp_path)
    pushed = push("alice/nohost:v2")
    r = httpx.get(f"{registry.url}/v2/alice/nohost/manifests/v2",
                  headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == pushed.digest
    b = homes.use("b")
    result = pull("alice/nohost:v2")
    assert result.source == "registry" and result.digest == pushed.digest
    assert (b / "models/manifests/registry.ember.local/alice/nohost/v2").is_file()
    # Pulling again finds everything present: nothing is downloaded.
    again = pull("alice/nohost:v2")
    local = Manifest.from_bytes(manifest_path(parse_name("alice/nohost:v2")).read_bytes())
    assert again.downloaded == 0 and again.reused == local.size


def test_push_skips_blobs_the_registry_already_has(registry, homes, tmp_path):
    homes.use("a")
    first = f"{registry.host}/alice/shared:one"
    second = f"{registry.host}/alice/shared:two"
    seed = next(seeds)
    m1 = make_model(first, tmp_path, seed=seed)
    make_model(second, tmp_path, seed=seed, system="A different system prompt.")
    r1 = push(first, insecure=True)
    assert r1.skipped == 0 and r1.uploaded == m1.size
    events: list[dict] = []
    r2 = push(second, insecure=True, progress=events.append)
    model = m1.layer("model")
    assert r2.skipped >= model.size and r2.uploaded < 1000  # only the new system prompt and config
    model_events = [e for e in events if e.get("digest") == model.digest]
    assert model_events == [{"status": f"pushing {model.digest[7:19]}", "digest": model.digest,
                             "total": model.size, "completed": model.size}]


def test_pull_fetches_a_blob_as_parallel_ranges(registry, homes, proxies):
    homes.use("a")
    data = os.urandom(600_000)
    name = f"{registry.host}/alice/ranges:latest"
    make_raw_model(name, data)
    push(name, insecure=True)
    proxy = proxies(registry.url)
    homes.mp.setenv("EMBER_REGISTRY", proxy.url)
    homes.use("b")
    local = "alice/ranges"
    events: list[dict] = []
    result = pull(local, progress=events.append, options=TransferOptions(part_size=64 << 10, parallel=4))
    assert resolve_model(local).path.read_bytes() == data
    assert result.downloaded == len(data) + Manifest.from_bytes(
        manifest_path(parse_name(local)).read_bytes()).config.size
    assert proxy.max_active >= 3  # several ranges of the blob were in flight at once
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    done = [e["completed"] for e in events if e.get("digest") == digest]
    assert done[0] == 0 and done[-1] == len(data) and done == sorted(done)


# ---- interrupted pulls resume ------------------------------------------------------------------------------


def test_pull_cut_off_half_way_resumes_and_fetches_only_the_rest(registry, homes, proxies):
    homes.use("a")
    data = os.urandom(800_000)
    name = "alice/cutoff"
    homes.mp.setenv("EMBER_REGISTRY", registry.url)
    manifest = make_raw_model(name, data)
    push(name)

    b = homes.use("b")
    before = listing(b)
    proxy = proxies(registry.url, cut_after=300_000)  # every connection dies after 300 kB of answers
    homes.mp.setenv("EMBER_REGISTRY", proxy.url)
    opts = TransferOptions(part_size=64 << 10, parallel=4, retries=1)
    with pytest.raises(EmberError):
        pull(name, options=opts)
    # Nothing published; the partial download is kept for the next attempt.
    assert not (b / "models/manifests").exists()
    assert not blob_path(manifest.layer("model").digest).exists()
    assert partial_files(b)
    saved = saved_progress(b)
    assert 0 < saved < manifest.size

    homes.mp.setenv("EMBER_REGISTRY", registry.url)
    result = pull(name, options=opts)
    assert result.reused == saved and result.downloaded == manifest.size - saved
    assert resolve_model(name).path.read_bytes() == data
    assert partial_files(b) == []
    assert set(listing(b)) - set(before) == {
        "models/manifests/registry.ember.local/alice/cutoff/latest",
        *(f"models/blobs/{layer.digest.replace(':', '-')}" for layer in (manifest.config, *manifest.layers)),
    }


def test_dropped_connection_is_resumed_by_range_within_one_pull(registry, homes, proxies):
    homes.use("a")
    data = os.urandom(500_000)
    homes.mp.setenv("EMBER_REGISTRY", registry.url)
    manifest = make_raw_model("alice/flaky", data)
    push("alice/flaky")
    homes.use("b")
    proxy = proxies(registry.url, cut_after=200_000, cut_once=True)
    homes.mp.setenv("EMBER_REGISTRY", proxy.url)
    result = pull("alice/flaky", options=TransferOptions(part_size=1 << 20, retries=3))
    assert proxy.cuts == 1
    # Each byte was written once: the retry asked for the rest of the range, not the blob again.
    assert result.downloaded == manifest.size and result.reused == 0
    assert resolve_model("alice/flaky").path.read_bytes() == data


def test_killed_cli_pull_resumes(registry, homes, proxies):
    homes.use("a")
    data = os.urandom(2_500_000)
    homes.mp.setenv("EMBER_REGISTRY", registry.url)
    manifest = make_raw_model("alice/killed", data)
    push("alice/killed")

    b = homes.use("b")
    proxy = proxies(registry.url, rate=150_000)  # bytes/s per connection: the pull takes several seconds
    env = {"EMBER_REGISTRY": proxy.url}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli.main", "pull", "alice/killed"],
                            env={**full_env, "EMBER_HOME": str(b), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while saved_progress(b) < 400_000:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the pull made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not (b / "models/manifests").exists()
    saved = saved_progress(b)
    assert 400_000 <= saved < manifest.size

    homes.mp.setenv("EMBER_REGISTRY", registry.url)
    result = pull("alice/killed")
    assert result.reused == saved and result.downloaded == manifest.size - saved
    assert resolve_model("alice/killed").path.read_bytes() == data
    assert partial_files(b) == []


# ---- bad data from the registry leaves the store as it was --------------------------------------------------


def _store_with_one_model(homes: Homes, tmp_path: Path) -> Path:
    b = homes.use("b")
    make_model("already/here", tmp_path)
    return b


def test_blob_whose_digest_does_not_match_is_rejected(registry, homes, tmp_path):
    homes.use("a")
    data = bytearray(os.urandom(300_000))
    name = f"{registry.host}/alice/flipped:latest"
    manifest = make_raw_model(name, bytes(data))
    push(name, insecure=True)
    stored = registry.blob_data(manifest.layer("model").digest)
    data[150_000] ^= 0xFF  # same size, different content: only the hash can tell
    stored.write_bytes(bytes(data))

    b = _store_with_one_model(homes, tmp_path)
    before = listing(b)
    with pytest.raises(EmberError, match="digest mismatch for blob " + manifest.layer("model").digest):
        pull(name, insecure=True, options=TransferOptions(part_size=64 << 10))
    assert listing(b) == before  # no manifest, no blob, no partial file


@pytest.mark.parametrize("how", ["registry file truncated", "manifest claims more bytes"])
def test_truncated_blob_is_rejected(registry, homes, tmp_path, how):
    homes.use("a")
    data = os.urandom(200_000)
    name = f"{registry.host}/alice/truncated-{how.split()[0]}:latest"
    manifest = make_raw_model(name, data)
    push(name, insecure=True)
    model = manifest.layer("model")
    if how == "registry file truncated":
        registry.blob_data(model.digest).write_bytes(data[:150_000])
    else:
        obj = json.loads(manifest.to_bytes())
        obj["layers"][0]["size"] = model.size + 1000
        push_raw_manifest(registry, "alice/" + name.split("/")[2].split(":")[0], "latest", obj)

    b = _store_with_one_model(homes, tmp_path)
    before = listing(b)
    # Parts download in parallel: whichever first meets the short blob reports it - a part straddling the end
    # sees the registry's total in Content-Range, a part wholly past it gets 416. Both name blob and sizes.
    sizes = (r"registry has (150000|200000) bytes of blob sha256:[0-9a-f]{64}, its manifest says (200000|201000)"
             r"|blob sha256:[0-9a-f]{64} on the registry is shorter than the (200000|201000) bytes its manifest says")
    with pytest.raises(EmberError, match=sizes):
        pull(name, insecure=True, options=TransferOptions(part_size=64 << 10))
    assert listing(b) == before


def _manifest_json(registry: Registry, homes: Homes, tmp_path: Path, repo: str) -> dict:
    homes.use("a")
    name = f"{registry.host}/{repo}:latest"
    manifest = make_raw_model(name, os.urandom(10_000))
    push(name, insecure=True)
    return json.loads(manifest.to_bytes())


@pytest.mark.parametrize("case, message", [
    ("swapped bytes", "manifest digest mismatch"),
    ("layer media type", "unsupported layer media type 'text/html'"),
    ("config media type", "unsupported config media type"),
    ("no model layer", "manifest has no model layer"),
    ("negative size", "invalid layer size -5"),
])
def test_bad_manifest_is_rejected(registry, homes, tmp_path, case, message):
    repo = "alice/badmanifest-" + case.replace(" ", "-")
    obj = _manifest_json(registry, homes, tmp_path, repo)
    if case == "swapped bytes":
        # The registry serves this file under the digest of the manifest it replaced.
        path = registry.manifest_data(repo, "latest")
        other = dict(obj, layers=obj["layers"] * 2)
        path.write_bytes(json.dumps(other).encode())
    elif case == "layer media type":
        obj["layers"][0]["mediaType"] = "text/html"
    elif case == "config media type":
        obj["config"]["mediaType"] = "application/x-anything"
    elif case == "no model layer":
        obj["layers"][0]["mediaType"] = MEDIA_TYPES["license"]
    elif case == "negative size":
        obj["layers"][0]["size"] = -5
    if case != "swapped bytes":
        push_raw_manifest(registry, repo, "latest", obj)

    b = _store_with_one_model(homes, tmp_path)
    before = listing(b)
    with pytest.raises(EmberError, match=message):
        pull(f"{registry.host}/{repo}", insecure=True)
    assert listing(b) == before


@pytest.mark.parametrize("declare_length", [True, False])
def test_oversized_manifest_is_not_read(homes, declare_length):
    """docker-registry refuses to store or serve a manifest over 4 MiB, so a plain HTTP server plays one
    that does; with or without Content-Length, Ember stops reading at its limit."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sent = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b'{"schemaVersion": 2, "padding": "' + b"x" * (64 << 20)
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
            if declare_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for i in range(0, len(body), 1 << 16):
                    piece = body[i:i + (1 << 16)]
                    self.wfile.write(piece if declare_length else b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent.append(len(piece))
            except OSError:
                pass  # the client hung up, as it should

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        b = homes.use("b")
        with pytest.raises(EmberError, match="manifest is larger than 4 MiB"):
            pull(f"127.0.0.1:{server.server_address[1]}/alice/big", insecure=True)
        assert listing(b) == {}
        time.sleep(0.2)
        assert sum(sent) < 32 << 20  # far from all 64 MiB went out
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["../x", "a/../../etc/passwd", "127.0.0.1:1/../../x", "x/y/z/w", "a:b:c", "/abs"])
def test_bad_names_are_rejected_before_anything_happens(registry, homes, tmp_path, name, capsys):
    from ember.cli.main import main

    b = _store_with_one_model(homes, tmp_path)
    before = listing(b)
    for args in (["pull", name, "--insecure"], ["push", name, "--insecure"], ["cp", "already/here", name],
                 ["rm", name], ["show", name]):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(f"Error: invalid model name '{name}'") and err.count("\n") == 1, err
    assert listing(b) == before


def test_missing_model_and_unreachable_registry_are_one_line_errors(registry, homes, tmp_path):
    b = homes.use("b")
    r = ember("pull", f"{registry.host}/alice/nosuch:latest", "--insecure", home=b)
    assert r.returncode == 1 and r.stderr.endswith(f"not found on registry {registry.url}\n"), r.stderr
    r = ember("pull", f"{registry.host}/alice/nosuch:latest", home=b)  # https to a plain-HTTP server
    assert r.returncode == 1 and "cannot reach registry https://" in r.stderr and "--insecure" in r.stderr
    r = ember("push", "not/installed", home=b, env={"EMBER_REGISTRY": registry.url})
    assert r.returncode == 1 and r.stderr == "Error: model 'not/installed' not found\n"
    r = ember("pull", "nohost", home=b)  # no catalogue entry, no EMBER_REGISTRY
    assert r.returncode == 1 and "model 'nohost' not found; known: smollm2, gemma3" in r.stderr
    assert listing(b) == {}


def test_partial_paths_stay_in_blobs(homes):
    homes.use("a")
    data, state = partial_paths("sha256:" + "a" * 64)
    assert data.parent == state.parent and data.parent.name == "blobs"
    with pytest.raises(EmberError):
        partial_paths("sha256:../../x")
    with pytest.raises(ModelNotFoundError):
        pull("../../etc")

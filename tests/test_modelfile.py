"""Modelfile parsing, and create / show / list / cp / rm through the real `ember` command with EMBER_HOME set."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from ember.errors import EmberError, GGUFError, ModelNotFoundError
from ember.store import resolve_model
from ember.store.blobs import blob_path, has_blob
from ember.store.create import copy, create, create_from_file, delete, prune, receive_blob, show
from ember.store.manifests import MEDIA_TYPES, read_manifest
from ember.store.modelfile import (
    PARAMETERS,
    Message,
    ModelfileError,
    convert_parameter,
    format_modelfile,
    parse_modelfile,
)
from ember.store.names import parse_name
from registry_helpers import listing  # every file of a store but locks/, with size and sha256
from tiny_models import write_tiny_model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ember-home"
    monkeypatch.setenv("EMBER_HOME", str(root))
    monkeypatch.delenv("EMBER_MODELS", raising=False)
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_model(path, seed=7)
    return path


def ember(*args: str, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env["EMBER_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


# ---- parsing ------------------------------------------------------------------------------------------------


def test_parse_every_instruction():
    mf = parse_modelfile(
        "# a comment\n"
        "\n"
        "from ./model.gguf\n"
        "PARAMETER temperature 0.7\n"
        "parameter num_ctx 2048\n"
        'PARAMETER stop "<|im_end|>"\n'
        "PARAMETER stop <|end|>\n"
        "PARAMETER penalize_newline false\n"
        'TEMPLATE """{{ if .System }}{{ .System }}\n'
        "{{ end }}   \n"
        '{{ .Prompt }}"""\n'
        'SYSTEM "You say \\"hi\\" a lot."\n'
        "MESSAGE user Is the sky blue?\n"
        'MESSAGE assistant """Yes.\nUsually."""\n'
        "LICENSE MIT\n"
        'LICENSE """Also\nthis."""\n'
    )
    assert mf.from_ == "./model.gguf"
    assert mf.parameters == {"temperature": 0.7, "num_ctx": 2048, "stop": ["<|im_end|>", "<|end|>"],
                             "penalize_newline": False}
    assert mf.template == "{{ if .System }}{{ .System }}\n{{ end }}   \n{{ .Prompt }}"  # verbatim, spaces kept
    assert mf.system == 'You say "hi" a lot.'
    assert mf.messages == (Message("user", "Is the sky blue?"), Message("assistant", "Yes.\nUsually."))
    assert mf.licenses == ("MIT", "Also\nthis.")
    assert parse_modelfile(format_modelfile(mf)) == mf


@pytest.mark.parametrize("text, message", [
    ("FROM x\nFORM y", "Modelfile line 2: unknown instruction 'FORM' (did you mean FROM?)"),
    ("FROM x\n\n# c\nRUN echo hi", "Modelfile line 4: unknown instruction 'RUN'"),
    ("FROM x\nADAPTER ./lora.gguf", "Modelfile line 2: ADAPTER is not supported"),
    ("FROM x\nDRAFT", "Modelfile line 2: DRAFT needs"),
    ("FROM x\nPARAMETER draft_num_predict 99", "Modelfile line 2: parameter 'draft_num_predict' must be between"),
    ("FROM x\nPARAMETER temprature 1", "Modelfile line 2: unknown parameter 'temprature' (did you mean temperature?)"),
    ("FROM x\nPARAMETER num_ctx big", "Modelfile line 2: parameter 'num_ctx' must be an integer, got 'big'"),
    ("FROM x\nPARAMETER num_ctx 2.5", "Modelfile line 2: parameter 'num_ctx' must be an integer"),
    ("FROM x\nPARAMETER top_p 1.5", "Modelfile line 2: parameter 'top_p' must be between 0 and 1, got '1.5'"),
    ("FROM x\nPARAMETER temperature nan", "Modelfile line 2: parameter 'temperature' must be a number"),
    ("FROM x\nPARAMETER use_mmap yes", "Modelfile line 2: parameter 'use_mmap' must be true or false"),
    ("FROM x\nPARAMETER seed", "Modelfile line 2: PARAMETER seed needs a value"),
    ("FROM x\nSYSTEM", "Modelfile line 2: SYSTEM needs a value"),
    ('FROM x\nSYSTEM "unclosed', "Modelfile line 2: SYSTEM: the quote is never closed"),
    ('FROM x\nTEMPLATE """open\nstill open\n', 'Modelfile line 2: TEMPLATE: """ is never closed'),
    ('FROM x\nTEMPLATE """a\nb""" extra', 'Modelfile line 3: unexpected text after the closing """'),
    ("FROM x\nMESSAGE robot hi", "Modelfile line 2: MESSAGE role must be one of system, user, assistant"),
    ("FROM x\nFROM y", "Modelfile line 2: FROM given twice (first on line 1)"),
    ("PARAMETER top_k 4\n", "Modelfile has no FROM instruction"),
    ("", "Modelfile has no FROM instruction"),
])
def test_parse_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert str(e.value).startswith(message), str(e.value)


def test_parameter_table_types():
    for name, spec in PARAMETERS.items():
        sample = {int: "1", float: "0.5", bool: "true", str: "x"}[spec.kind]
        assert isinstance(convert_parameter(name, sample), spec.kind)
    assert convert_parameter("num_ctx", 4096.0) == 4096  # JSON numbers from /api/create
    with pytest.raises(ModelfileError):
        convert_parameter("num_ctx", True)
    with pytest.raises(ModelfileError):
        convert_parameter("stop", 5)


# ---- create / show / cp / rm (API) ----------------------------------------------------------------------------


def test_create_writes_ollama_layers_and_load_sees_them(home, tmp_path, tiny_gguf):
    mf = tmp_path / "Modelfile"
    mf.write_text(f"FROM {tiny_gguf}\nTEMPLATE {{{{ messages }}}}\nSYSTEM Be kind.\nPARAMETER num_ctx 64\n"
                  "PARAMETER stop <x>\nMESSAGE user hi\nLICENSE L1\nLICENSE L2\n")
    events: list[dict] = []
    result = create_from_file("alice/kind:v1", mf, progress=events.append)
    m = result.manifest
    assert [layer.media_type for layer in m.layers] == [MEDIA_TYPES[r] for r in
                                                        ("model", "template", "system", "params", "messages",
                                                         "license", "license")]
    assert blob_path(m.layer("model").digest).read_bytes() == tiny_gguf.read_bytes()
    assert json.loads(blob_path(m.layer("params").digest).read_text()) == {"num_ctx": 64, "stop": ["<x>"]}
    assert json.loads(blob_path(m.layer("messages").digest).read_text()) == [{"role": "user", "content": "hi"}]
    config = json.loads(blob_path(m.config.digest).read_text())
    assert config["model_family"] == "llama" and config["file_type"] == "Q4_0"
    assert config["rootfs"]["diff_ids"] == [layer.digest for layer in m.layers]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "parsing GGUF" and statuses[-2:] == ["writing manifest", "success"]
    r = resolve_model("alice/kind:v1")
    assert (r.template, r.system, r.params["num_ctx"]) == ("{{ messages }}", "Be kind.", 64)


def test_create_from_a_store_model_inherits_and_overrides(home, tmp_path, tiny_gguf):
    base = parse_modelfile(f"FROM {tiny_gguf}\nSYSTEM base system\nTEMPLATE base template\n"
                           "PARAMETER temperature 0.1\nPARAMETER stop <a>\nLICENSE base license\n")
    create("base", base)
    child = create("child", parse_modelfile("FROM base\nSYSTEM child system\nPARAMETER stop <b>\n"
                                             "PARAMETER top_k 5\n"))
    info = show("child")
    assert info["system"] == "child system" and info["template"] == "base template"
    assert info["license"] == "base license"
    params = json.loads(blob_path(child.manifest.layer("params").digest).read_text())
    assert params == {"temperature": 0.1, "stop": ["<b>"], "top_k": 5}  # stop replaced, others merged
    # The weights are shared, not copied.
    assert child.manifest.layer("model") == read_manifest(parse_name("base")).layer("model")


def test_show_reports_gguf_facts_and_a_modelfile_that_recreates_the_model(home, tiny_gguf):
    mf = parse_modelfile(f'FROM {tiny_gguf}\nSYSTEM """two\nlines"""\nPARAMETER stop "a b"\nPARAMETER seed 3\n'
                         "MESSAGE assistant ok\nLICENSE MIT\n")
    first = create("orig", mf).manifest
    info = show("orig")
    assert info["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                               "parameter_size": info["details"]["parameter_size"], "quantization_level": "Q4_0"}
    assert info["model_info"]["general.architecture"] == "llama"
    assert info["model_info"]["general.parameter_count"] > 1_000_000 and info["context_length"] == 256
    assert info["parameters"].splitlines() == ['seed                           3',
                                               'stop                           "a b"']
    assert info["modelfile"].startswith('# Modelfile generated by "ember show"')
    again = create("again", parse_modelfile(info["modelfile"])).manifest
    assert again == first  # same layers, same config: byte-identical manifest


def test_quantize_while_creating(home, tmp_path):
    src = tmp_path / "f16.gguf"
    write_tiny_model(src, qtype=T.F16, seed=3)
    events: list[dict] = []
    m = create("quant", parse_modelfile(f"FROM {src}"), quantize="q8_0", progress=events.append).manifest
    assert show("quant")["details"]["quantization_level"] == "Q8_0"
    assert m.layer("model").size < src.stat().st_size
    quantizing = [e for e in events if e["status"] == "quantizing F16 model to Q8_0"]
    assert quantizing and quantizing[-1]["completed"] == quantizing[-1]["total"]
    assert not list((home / "models" / "blobs").glob(".tmp-*"))  # no temp file left behind


@pytest.mark.parametrize("modelfile, quantize, error, message", [
    ("FROM nosuch/model", None, ModelNotFoundError, "FROM nosuch/model: base model not found"),
    ("FROM ./missing.gguf", None, ModelNotFoundError, "FROM ./missing.gguf: file"),
    ("FROM {notgguf}", None, GGUFError, "FROM "),
    ("FROM {gguf}", "Q9_9", EmberError, "unknown quantization type 'Q9_9'"),
    ("FROM {gguf}", "Q8_0", EmberError, "quantiz"),  # already Q4_0: requantizing is refused
    ("FROM {gguf}\nADAPTER x", None, ModelfileError, "Modelfile line 2: ADAPTER"),
])
def test_failed_create_leaves_the_store_as_it_was(home, tmp_path, tiny_gguf, modelfile, quantize, error, message):
    create("existing", parse_modelfile(f"FROM {tiny_gguf}\nSYSTEM hi\n"))
    before = listing(home)
    notgguf = tmp_path / "notgguf.gguf"
    notgguf.write_bytes(b"GGUF" + b"\0" * 100)
    path = tmp_path / "Modelfile"
    path.write_text(modelfile.format(gguf=tiny_gguf, notgguf=notgguf) + "\nSYSTEM new system prompt\n")
    with pytest.raises(error) as e:
        create_from_file("new", path, quantize=quantize)
    assert message in str(e.value)
    assert listing(home) == before


def test_copy_and_delete_prune_only_unshared_blobs(home, tiny_gguf):
    first = create("one", parse_modelfile(f"FROM {tiny_gguf}\nSYSTEM first\n")).manifest
    copy("one", "two")
    assert (home / "models/manifests/registry.ember.local/library/two/latest").read_bytes() == \
        (home / "models/manifests/registry.ember.local/library/one/latest").read_bytes()
    third = create("three", parse_modelfile(f"FROM {tiny_gguf}\nSYSTEM third\n")).manifest
    assert delete("one") == []  # "two" still uses every blob
    removed = delete("two")
    assert first.layer("system").digest in removed and first.config.digest in removed
    assert first.layer("model").digest not in removed and has_blob(third.layer("model").digest)
    assert not (home / "models/manifests/registry.ember.local/library/one").exists()
    with pytest.raises(ModelNotFoundError, match="model 'two' not found"):
        delete("two")
    with pytest.raises(ModelNotFoundError):
        copy("nosuch", "x")


def test_prune_and_receive_blob(home):
    data = b"uploaded weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    before = listing(home)
    with pytest.raises(EmberError, match="digest mismatch"):
        receive_blob(digest, [b"something else"])
    assert listing(home) == before
    assert receive_blob(digest, [data[:5], data[5:]]) is True
    assert receive_blob(digest, [data]) is False
    assert prune() == [digest] and not has_blob(digest)


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_create_show_list_cp_rm(home, tmp_path, tiny_gguf):
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (tmp_path / "Modelfile").write_text(
        'FROM ./tiny.gguf\nSYSTEM """You are tiny."""\nPARAMETER temperature 0.5\nLICENSE Apache-2.0\n')
    r = ember("create", "tiny", home=home, cwd=tmp_path)  # -f defaults to ./Modelfile
    assert r.returncode == 0, r.stderr
    assert "copying file 100%" in r.stderr and r.stderr.rstrip().endswith("success")

    r = ember("show", "tiny", home=home)
    assert r.returncode == 0, r.stderr
    assert "architecture        llama" in r.stdout and "quantization        Q4_0" in r.stdout
    assert "temperature                    0.5" in r.stdout and "You are tiny." in r.stdout
    for flag, expected in (("--system", "You are tiny.\n"), ("--license", "Apache-2.0\n"),
                           ("--parameters", "temperature                    0.5\n")):
        assert ember("show", "tiny", flag, home=home).stdout == expected
    modelfile = ember("show", "tiny", "--modelfile", home=home).stdout
    assert "\nFROM " in modelfile and 'SYSTEM "You are tiny."' not in modelfile and "SYSTEM You are tiny." in modelfile

    assert ember("cp", "tiny", "alice/copy:v1", home=home).stdout == "copied 'tiny' to 'alice/copy:v1'\n"
    rows = [line.split() for line in ember("list", home=home).stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["alice/copy:v1", "tiny:latest"] and rows[0][1] == rows[1][1]

    r = ember("rm", "tiny", "alice/copy:v1", home=home)
    assert r.returncode == 0 and r.stdout == "deleted 'tiny'\ndeleted 'alice/copy:v1'\n"
    assert ember("list", home=home).stdout.splitlines()[1:] == []
    assert not [p for p in (home / "models" / "blobs").iterdir()]  # every blob went with its last model


def test_cli_errors_leave_the_store_as_it_was(home, tmp_path, tiny_gguf):
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_gguf}\n")
    assert ember("create", "keep", "-f", str(tmp_path / "Modelfile"), home=home).returncode == 0
    before = listing(home)
    (tmp_path / "Bad").write_text(f"FROM {tiny_gguf}\nSYSTEM ok\nINSTRUCT nonsense\n")
    cases = [
        (["create", "bad", "-f", str(tmp_path / "Bad")], "Error: Modelfile line 3: unknown instruction 'INSTRUCT'"),
        (["create", "bad", "-f", str(tmp_path / "nosuch")], "Error: Modelfile "),
        (["create", "../bad", "-f", str(tmp_path / "Bad")], "Error: invalid model name '../bad'"),
        (["show", "nosuch"], "Error: model 'nosuch' not found"),
        (["rm", "nosuch"], "Error: model 'nosuch' not found"),
        (["cp", "nosuch", "other"], "Error: model 'nosuch' not found"),
    ]
    for args, message in cases:
        r = ember(*args, home=home)
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, (args, r.stderr)
    assert listing(home) == before


# ---- DRAFT (speculative decoding) ------------------------------------------------------------------------


def test_draft_is_stored_as_a_layer_and_loads_a_speculating_model(home, tiny_gguf, tmp_path):
    import ember as ember_api

    draft = tmp_path / "draft.gguf"
    write_tiny_model(draft, qtype=T.Q8_0, n_layer=1, seed=11)  # same vocabulary, other weights
    mf = parse_modelfile(f"FROM {tiny_gguf}\nDRAFT {draft}\nPARAMETER draft_num_predict 5\n")
    assert mf.draft == str(draft)
    create("spec", mf)
    manifest = read_manifest(parse_name("spec"))
    layer = manifest.layer("draft")
    assert layer is not None and layer.media_type == MEDIA_TYPES["draft"]
    assert layer.digest == "sha256:" + hashlib.sha256(draft.read_bytes()).hexdigest()
    assert has_blob(layer.digest, layer.size)
    assert f"DRAFT {blob_path(layer.digest)}" in show("spec")["modelfile"]
    # A model built FROM it inherits the draft; prune keeps the draft blob while a manifest names it.
    create("spec2", parse_modelfile("FROM spec\nSYSTEM hi\n"))
    assert read_manifest(parse_name("spec2")).layer("draft") == layer
    delete("spec")
    prune()
    assert has_blob(layer.digest, layer.size)

    m = ember_api.load("spec2", threads=1)
    try:
        assert m.draft is not None and m.engine.config.speculative.method == "draft"
        assert m.engine.config.speculative.num_tokens == 5
        out = m.generate("hello world", max_tokens=12, temperature=0)
        plain = ember_api.load(tiny_gguf, threads=1).generate("hello world", max_tokens=12, temperature=0)
        assert out.ids == plain.ids  # greedy: the draft changes speed, never tokens
        assert out.stats.draft_tokens > 0
    finally:
        m.close()


def test_draft_with_another_vocabulary_is_refused_and_store_unchanged(home, tiny_gguf, tmp_path):
    import gguf

    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "x"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = sorted(p.name for p in (home / "models").rglob("*")) if (home / "models").exists() else []
    with pytest.raises(ModelfileError, match="vocabulary differs"):
        create("bad", parse_modelfile(f"FROM {tiny_gguf}\nDRAFT {other}\n"))
    after = sorted(p.name for p in (home / "models").rglob("*")) if (home / "models").exists() else []
    assert read_manifest(parse_name("bad")) is None
    assert [n for n in after if n not in before and n.startswith("sha256")] == []


def test_delete_drops_the_models_repacked_weights(home, tiny_gguf, tmp_path, monkeypatch):
    """`ember rm` of the last model using a GGUF blob also removes that blob's pack-cache entry
    (ember/model/pack_cache.py), and only that one."""
    import ember
    from ember.model import pack_cache
    from ember.store.blobs import blob_path

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    made = create("gone", parse_modelfile(f"FROM {tiny_gguf}\n")).manifest
    blob = blob_path(made.layer("model").digest)
    ember.load("gone", n_ctx=32).close()
    ember.load(str(tiny_gguf), n_ctx=32).close()  # the same bytes at another path: its own entry
    entries = {f.name for f in pack_cache.cache_root().glob("*.pt")}
    mine = pack_cache.entry_key(blob) + ".pt"
    assert mine in entries and len(entries) == 2
    delete("gone")
    assert not blob.exists()
    assert {f.name for f in pack_cache.cache_root().glob("*.pt")} == entries - {mine}

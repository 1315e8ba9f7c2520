"""Creating and managing store models: create (from a Modelfile), copy, delete, prune, show.

`create` writes a manifest in Ollama's layout, so a created model pushes to and pulls from a registry as is:

| layer (in order) | media type                            | content                                     |
|------------------|---------------------------------------|---------------------------------------------|
| model            | application/vnd.ollama.image.model    | the GGUF file (quantized first with -q)     |
| template         | application/vnd.ollama.image.template | TEMPLATE text                               |
| system           | application/vnd.ollama.image.system   | SYSTEM text                                 |
| params           | application/vnd.ollama.image.params   | PARAMETERs as a JSON object (stop: a list)  |
| messages         | application/vnd.ollama.image.messages | MESSAGEs as a JSON list of {role, content}  |
| license          | application/vnd.ollama.image.license  | each LICENSE text                           |
| (config)         | application/vnd.docker.container.image.v1+json | model family/type/file type, layer digests |

FROM a store model inherits its layers; the Modelfile overrides template and system, adds parameters (its
`stop` list replaces the base's), and replaces messages and licenses when it gives any.

Create progress events (Ollama's): {"status": "parsing GGUF"}, {"status": "copying file", "total",
"completed"}, {"status": "quantizing <F16> model to <Q4_K_M>", "total", "completed"} (tensors),
{"status": "using existing layer sha256:.."} / {"status": "creating new layer sha256:.."},
{"status": "writing manifest"}, {"status": "success"}.

Blobs are published first and the manifest last; a failed create removes the blobs it added (unless another
manifest uses them), so the store is as it was. Pruning takes the store lock exclusively and everything that
publishes blobs before their manifest takes it shared, so a prune never deletes a blob whose manifest is
about to be written.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.errors import EmberError, GGUFError, ModelNotFoundError
from ember.model import pack_cache
from ember.store.blobs import BlobWriter, blob_path, check_digest, has_blob, hash_file, write_blob
from ember.store.home import PUBLISHED_MODE, TEMP_PREFIX, atomic_write_bytes, ensure_dir, fsync_dir, home
from ember.store.manifests import (
    CONFIG_MEDIA_TYPE,
    MEDIA_TYPES,
    Layer,
    Manifest,
    local_manifest_bytes,
    manifest_path,
    read_manifest,
)
from ember.store.modelfile import Message, Modelfile, ModelfileError, add_parameter, format_modelfile, read_modelfile
from ember.store.names import ModelName, parse_name

Event = dict[str, Any]
ProgressFn = Callable[[Event], None]

_DIGEST_IN_TEXT = re.compile(rb"sha256:[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"sha256-[0-9a-f]{64}")
_FROM_DIGEST = re.compile(r"@?(sha256)[:-]([0-9a-f]{64})")
_CHUNK = 1 << 20
_MAX_TEXT_LAYER = 16 << 20  # template/system/params/messages/license are text; refuse to read more


def _quiet(event: Event) -> None:
    pass


@contextlib.contextmanager
def store_lock(shared: bool) -> Iterator[None]:
    """Shared: publishing blobs and then their manifest. Exclusive: deleting blobs (rm, prune)."""
    path = ensure_dir(home().locks) / "store.lock"
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---- GGUF facts --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    parameters: int
    context_length: int
    embedding_length: int
    quantization: str
    metadata: dict[str, Any]


def human_count(n: int) -> str:
    """Parameter count as Ollama's parameter_size: "135M", "7.2B"."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def gguf_info(path: Path) -> GGUFInfo:
    """Facts `show` reports and the config blob records; raises GGUFError for a file that is not a GGUF."""
    from ember.gguf import open_gguf
    from ember.quant.mix import FILE_TYPES

    with open_gguf(path) as f:
        md = dict(f.metadata)
        arch = f.architecture
        n_params = sum(t.n_elements for t in f.tensors.values())
        by_type: dict[str, int] = {}
        for t in f.tensors.values():
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_elements
    names = {ft.ftype: ft.name for ft in FILE_TYPES.values()}
    file_type = md.get("general.file_type")
    quant = names.get(int(file_type)) if isinstance(file_type, int) else None
    quant = quant or (max(by_type, key=by_type.get) if by_type else "unknown")
    return GGUFInfo(
        architecture=arch,
        parameters=n_params,
        context_length=int(md.get(f"{arch}.context_length", 0) or 0),
        embedding_length=int(md.get(f"{arch}.embedding_length", 0) or 0),
        quantization=quant,
        metadata=md,
    )


# ---- reading a model's layers --------------------------------------------------------------------------------


def _text(layer: Layer | None) -> str | None:
    if layer is None:
        return None
    if layer.size > _MAX_TEXT_LAYER:
        raise EmberError(f"layer {layer.digest} is {layer.size} bytes; too large for a text layer")
    try:
        return blob_path(layer.digest).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise EmberError(f"blob {layer.digest} is missing from the store") from None


def _json_layer(layer: Layer | None, kind: type) -> Any:
    raw = _text(layer)
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise EmberError(f"layer {layer.digest if layer else ''} is not valid JSON: {e}") from e
    if not isinstance(value, kind):
        raise EmberError(f"layer {layer.digest if layer else ''} is not a JSON {kind.__name__}")
    return value


def _messages(layer: Layer | None) -> tuple[Message, ...]:
    out = []
    for m in _json_layer(layer, list):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _licenses(manifest: Manifest) -> tuple[str, ...]:
    return tuple(_text(layer) or "" for layer in manifest.layers if layer.media_type == MEDIA_TYPES["license"])


def _installed(name: str) -> tuple[ModelName, Manifest]:
    parsed = parse_name(name)
    manifest = read_manifest(parsed)
    if manifest is None:
        raise ModelNotFoundError(f"model '{name}' not found")
    return parsed, manifest


def _model_layer(name: ModelName, manifest: Manifest) -> Layer:
    layer = manifest.layer("model")
    if layer is None or not has_blob(layer.digest, layer.size):
        raise EmberError(f"model '{name}' is incomplete (its weights blob is missing or truncated)")
    return layer


def model_modelfile(name: str) -> Modelfile:
    """The Modelfile equivalent of an installed model (FROM its weights blob)."""
    parsed, manifest = _installed(name)
    layer = _model_layer(parsed, manifest)
    return Modelfile(
        from_=str(blob_path(layer.digest)),
        parameters=_json_layer(manifest.layer("params"), dict),
        template=_text(manifest.layer("template")),
        system=_text(manifest.layer("system")),
        messages=_messages(manifest.layer("messages")),
        licenses=_licenses(manifest),
        draft=_draft_blob(manifest),
    )


def _draft_blob(manifest: Manifest) -> str | None:
    layer = manifest.layer("draft")
    return str(blob_path(layer.digest)) if layer is not None else None


# ---- create -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateResult:
    name: ModelName
    manifest: Manifest


@dataclass(frozen=True)
class _Source:
    path: Path  # the GGUF to read
    digest: str | None = None  # already a store blob
    base: Manifest | None = None  # FROM a store model: what is inherited


def _looks_like_path(value: str, base_dir: Path | None) -> bool:
    if value.lower().endswith(".gguf") or value.startswith(("/", ".", "~")):
        return True
    return (base_dir or Path.cwd()).joinpath(value).exists()


def _resolve_from(mf: Modelfile) -> _Source:
    value = mf.from_
    m = _FROM_DIGEST.fullmatch(value)
    if m:
        digest = f"sha256:{m.group(2)}"
        if not has_blob(digest):
            raise ModelNotFoundError(f"FROM {value}: no such blob in the store (upload it first)")
        return _Source(path=blob_path(digest), digest=digest)
    if _looks_like_path(value, mf.base_dir):
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (mf.base_dir or Path.cwd()) / path
        if path.is_dir():
            raise ModelfileError(f"FROM {value}: a directory (safetensors) is not supported; convert it to GGUF")
        if not path.is_file():
            raise ModelNotFoundError(f"FROM {value}: file {path} not found")
        path = path.resolve()
        if path.parent == home().blobs.resolve() and _BLOB_NAME.fullmatch(path.name):
            digest = path.name.replace("-", ":", 1)  # a store blob (ember show --modelfile writes these)
            return _Source(path=path, digest=digest)
        return _Source(path=path)
    parsed = parse_name(value)
    manifest = read_manifest(parsed)
    if manifest is None:
        from ember.store.catalog import ensure_model, lookup

        if lookup(parsed) is None:
            raise ModelNotFoundError(f"FROM {value}: base model not found; pull it first")
        ensure_model(value)  # catalogue models install on first use, as everywhere else
        manifest = read_manifest(parsed)
        if manifest is None:
            raise ModelNotFoundError(f"FROM {value}: base model not found")
    layer = _model_layer(parsed, manifest)
    return _Source(path=blob_path(layer.digest), digest=layer.digest, base=manifest)


def _check_draft(main: Path, draft: Path, name: str) -> None:
    """A draft must speak the main model's vocabulary token for token: its proposals are token ids."""
    from ember.gguf import open_gguf

    try:
        with open_gguf(main) as a, open_gguf(draft) as b:
            same = a.metadata.get("tokenizer.ggml.tokens") == b.metadata.get("tokenizer.ggml.tokens")
    except GGUFError as e:
        raise GGUFError(f"DRAFT {name}: {e}") from e
    if not same:
        raise ModelfileError(f"DRAFT {name}: its vocabulary differs from the model's; a draft model must use "
                             "the same tokenizer")


def _publish_file(tmp: Path, new_blobs: list[str]) -> tuple[str, int]:
    """Move a finished file in blobs/ to its content address."""
    digest = hash_file(tmp)
    size = tmp.stat().st_size
    target = blob_path(digest)
    if has_blob(digest, size):
        tmp.unlink()
    else:
        os.chmod(tmp, PUBLISHED_MODE)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        new_blobs.append(digest)
    return digest, size


def _import_file(path: Path, progress: ProgressFn, new_blobs: list[str]) -> tuple[str, int]:
    total = path.stat().st_size
    h = hashlib.sha256()  # ours, to know the digest (and whether it is new) before publishing
    with BlobWriter() as writer, open(path, "rb") as src:
        progress({"status": "copying file", "total": total, "completed": 0})
        while block := src.read(_CHUNK):
            writer.write(block)
            h.update(block)
            progress({"status": "copying file", "total": total, "completed": writer.size})
        digest = "sha256:" + h.hexdigest()
        existed = has_blob(digest, writer.size)
        writer.commit(expected_digest=digest)
    if not existed:
        new_blobs.append(digest)
    return digest, writer.size


def _quantize(src: Path, qtype: str, from_type: str, progress: ProgressFn, new_blobs: list[str]) -> tuple[str, int]:
    from ember.quant.mix import file_type
    from ember.quant.quantize import quantize_file

    ft = file_type(qtype)  # unknown types fail here, before any work
    status = f"quantizing {from_type} model to {ft.name}"
    fd, tmp_name = tempfile.mkstemp(dir=ensure_dir(home().blobs), prefix=f"{TEMP_PREFIX}quantize-", suffix=".gguf")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        quantize_file(src, tmp, ft,
                      progress=lambda p: progress({"status": status, "total": p.count, "completed": p.index}))
        return _publish_file(tmp, new_blobs)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with contextlib.suppress(FileNotFoundError):  # quantize_file's own temp, if it died mid-write
            tmp.with_name(f"{tmp.name}.tmp-{os.getpid()}").unlink()


def _layer_for(role: str, data: bytes, progress: ProgressFn, new_blobs: list[str]) -> Layer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if has_blob(digest, len(data)):
        progress({"status": f"using existing layer {digest}"})
    else:
        progress({"status": f"creating new layer {digest}"})
        write_blob(data)
        new_blobs.append(digest)
    return Layer(media_type=MEDIA_TYPES[role], digest=digest, size=len(data))


def create(name: str, modelfile: Modelfile, *, quantize: str | None = None,
           progress: ProgressFn | None = None) -> CreateResult:
    """`ember create` / POST /api/create: build model `name` from a parsed Modelfile."""
    progress = progress or _quiet
    target = parse_name(name)
    source = _resolve_from(modelfile)
    progress({"status": "parsing GGUF"})
    try:
        info = gguf_info(source.path)
    except GGUFError as e:
        raise GGUFError(f"FROM {modelfile.from_}: {e}") from e
    base = source.base
    draft_layer = base.layer("draft") if base else None  # inherited unless the Modelfile names one
    draft_source = None
    if modelfile.draft is not None:
        draft_source = _resolve_from(replace(modelfile, from_=modelfile.draft))
        _check_draft(source.path, draft_source.path, modelfile.draft)
    params: dict[str, Any] = dict(_json_layer(base.layer("params"), dict)) if base else {}
    if "stop" in modelfile.parameters:
        params.pop("stop", None)  # a Modelfile's stop list replaces the base's
    for key, value in modelfile.parameters.items():
        add_parameter(params, key, value)
    template = modelfile.template if modelfile.template is not None else (
        _text(base.layer("template")) if base else None)
    system = modelfile.system if modelfile.system is not None else (_text(base.layer("system")) if base else None)
    messages = modelfile.messages or (_messages(base.layer("messages")) if base else ())
    licenses = modelfile.licenses or (_licenses(base) if base else ())

    new_blobs: list[str] = []
    try:
        with store_lock(shared=True):
            if quantize:
                digest, size = _quantize(source.path, quantize, info.quantization, progress, new_blobs)
                info = gguf_info(blob_path(digest))
                progress({"status": f"creating new layer {digest}"})
            elif source.digest is not None:
                digest, size = source.digest, blob_path(source.digest).stat().st_size
                progress({"status": f"using existing layer {digest}"})
            else:
                digest, size = _import_file(source.path, progress, new_blobs)
                progress({"status": f"creating new layer {digest}"})
            layers = [Layer(media_type=MEDIA_TYPES["model"], digest=digest, size=size)]
            if draft_source is not None:
                if draft_source.digest is not None:
                    d_digest = draft_source.digest
                    d_size = blob_path(d_digest).stat().st_size
                else:
                    d_digest, d_size = _import_file(draft_source.path, progress, new_blobs)
                draft_layer = Layer(media_type=MEDIA_TYPES["draft"], digest=d_digest, size=d_size)
            if draft_layer is not None:
                layers.append(draft_layer)
            if template is not None:
                layers.append(_layer_for("template", template.encode(), progress, new_blobs))
            if system is not None:
                layers.append(_layer_for("system", system.encode(), progress, new_blobs))
            if params:
                data = json.dumps(params, sort_keys=True, ensure_ascii=False).encode()
                layers.append(_layer_for("params", data, progress, new_blobs))
            if messages:
                data = json.dumps([m.to_json() for m in messages], ensure_ascii=False).encode()
                layers.append(_layer_for("messages", data, progress, new_blobs))
            for text in licenses:
                layers.append(_layer_for("license", text.encode(), progress, new_blobs))
            config = {
                "model_format": "gguf",
                "model_family": info.architecture,
                "model_families": [info.architecture],
                "model_type": human_count(info.parameters),
                "file_type": info.quantization,
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            }
            config_layer = _layer_for_config(json.dumps(config, indent=2).encode(), new_blobs)
            manifest = Manifest(config=config_layer, layers=tuple(layers))
            progress({"status": "writing manifest"})
            atomic_write_bytes(manifest_path(target), manifest.to_bytes())
    except BaseException:
        _drop_unreferenced(new_blobs)
        raise
    progress({"status": "success"})
    return CreateResult(name=target, manifest=manifest)


def _layer_for_config(data: bytes, new_blobs: list[str]) -> Layer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not has_blob(digest, len(data)):
        write_blob(data)
        new_blobs.append(digest)
    return Layer(media_type=CONFIG_MEDIA_TYPE, digest=digest, size=len(data))


def create_from_file(name: str, path: str | Path, *, quantize: str | None = None,
                     progress: ProgressFn | None = None) -> CreateResult:
    """`ember create NAME -f Modelfile`: relative FROM paths are relative to the Modelfile."""
    parse_name(name)  # a bad name fails before the Modelfile is even read
    return create(name, read_modelfile(path), quantize=quantize, progress=progress)


# ---- copy, delete, prune -------------------------------------------------------------------------------------


def copy(src: str, dst: str) -> ModelName:
    """`ember cp` / POST /api/copy: a second name for the same manifest (byte for byte, so the same ID)."""
    source = parse_name(src)
    target = parse_name(dst)
    try:
        raw = manifest_path(source).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelNotFoundError(f"model '{src}' not found") from None
    Manifest.from_bytes(raw)  # never spread a corrupt manifest
    atomic_write_bytes(manifest_path(target), raw)
    return target


def referenced_digests() -> set[str]:
    """Every digest any manifest file mentions. Read as text, so even a manifest that no longer parses
    keeps its blobs: pruning errs towards keeping data."""
    root = home().manifests
    out: set[str] = set()
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError):
                    out.update(m.decode() for m in _DIGEST_IN_TEXT.findall(path.read_bytes()))
    return out


def _remove_blobs(candidates: Iterable[str]) -> list[str]:
    """Delete the candidates no manifest references; caller holds the store lock exclusively."""
    keep = referenced_digests()
    removed = []
    for digest in sorted(set(candidates) - keep):
        with contextlib.suppress(FileNotFoundError):
            pack_cache.forget(blob_path(digest))  # its repacked weights go with it
            blob_path(digest).unlink()
            removed.append(digest)
    return removed


def _drop_unreferenced(digests: list[str]) -> None:
    if digests:
        with contextlib.suppress(OSError), store_lock(shared=False):
            _remove_blobs(digests)


def delete(name: str) -> list[str]:
    """`ember rm` / DELETE /api/delete: remove the manifest, then its blobs no other model uses.
    Returns the removed blob digests."""
    _, path, raw = local_manifest_bytes(name)
    with store_lock(shared=False):
        path.unlink()
        fsync_dir(path.parent)
        root = home().manifests
        parent = path.parent
        while parent != root and root in parent.parents:  # drop now-empty tag/model/namespace/host folders
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return _remove_blobs(m.decode() for m in _DIGEST_IN_TEXT.findall(raw))


def prune() -> list[str]:
    """Remove every blob no manifest references (not partial downloads, which a pull may be resuming)."""
    blobs = home().blobs
    if not blobs.is_dir():
        return []
    with store_lock(shared=False):
        names = [p.name for p in blobs.iterdir() if _BLOB_NAME.fullmatch(p.name)]
        return _remove_blobs(n.replace("-", ":", 1) for n in names)


def receive_blob(digest: str, chunks: Iterable[bytes]) -> bool:
    """POST /api/blobs/<digest>: store uploaded bytes if they hash to `digest` (EmberError otherwise, and
    nothing is kept). Returns False when the blob was already there. HEAD /api/blobs/<digest> is
    `ember.store.blobs.has_blob(digest)`."""
    check_digest(digest)
    if has_blob(digest):
        for _ in chunks:  # drain the request body
            pass
        return False
    with BlobWriter() as writer:
        for chunk in chunks:
            writer.write(chunk)
        writer.commit(expected_digest=digest)
    return True


# ---- show ---------------------------------------------------------------------------------------------------


def _scalar_metadata(md: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in md.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out  # token tables and other arrays are large; /api/show lists them only when verbose


def format_parameters(params: dict[str, Any]) -> str:
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}")
    return "\n".join(lines)


def show(name: str) -> dict[str, Any]:
    """`ember show` / POST /api/show: what Ollama's show returns (modelfile, parameters, template, system,
    license, details, model_info, messages, modified_at)."""
    parsed, manifest = _installed(name)
    mf = model_modelfile(name)
    layer = _model_layer(parsed, manifest)
    info = gguf_info(blob_path(layer.digest))
    model_info = _scalar_metadata(info.metadata)
    model_info.setdefault("general.architecture", info.architecture)
    model_info["general.parameter_count"] = info.parameters
    header = (f'# Modelfile generated by "ember show"\n# To build a new Modelfile based on this, '
              f"replace FROM with:\n# FROM {parsed.display}\n")
    mtime = manifest_path(parsed).stat().st_mtime
    return {
        "modelfile": format_modelfile(mf, header=header),
        "parameters": format_parameters(mf.parameters),
        "template": mf.template if mf.template is not None else str(info.metadata.get("tokenizer.chat_template", "")),
        "system": mf.system or "",
        "license": "\n".join(mf.licenses),
        "messages": [m.to_json() for m in mf.messages],
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": info.architecture,
            "families": [info.architecture],
            "parameter_size": human_count(info.parameters),
            "quantization_level": info.quantization,
        },
        "model_info": model_info,
        "context_length": info.context_length,
        "embedding_length": info.embedding_length,
        "modified_at": datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat(),
    }


__all__ = [
    "CreateResult",
    "GGUFInfo",
    "copy",
    "create",
    "create_from_file",
    "delete",
    "gguf_info",
    "human_count",
    "model_modelfile",
    "prune",
    "receive_blob",
    "referenced_digests",
    "show",
    "store_lock",
]

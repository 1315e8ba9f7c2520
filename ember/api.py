"""Ember's public Python API: `ember.load(...)` returns a Model.

    m = ember.load("smollm2")                    # a catalogue/store name or a .gguf path
    m.tokenize("Hello"); m.detokenize([...]); m.logits(ids); m.logits(ids, all_positions=True)
    m.generate("Once upon a time", max_tokens=32, temperature=0)        -> Completion
    for chunk in m.chat([{"role": "user", "content": "Hi"}], stream=True): print(chunk.text, end="")

Everything here is a thin edge: text and messages become token ids once, the engine works on ids, and
ids become text once through the streaming detokenizer.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ember.engine.engine import Engine, EngineConfig
from ember.engine.generator import Completion, GenerationOptions, TokenStream
from ember.engine.sampler import SamplingParams
from ember.engine.speculative import DEFAULT_DRAFT_TOKENS, SpeculativeConfig
from ember.errors import ContextOverflowError, EmberError, GGUFError, InvalidParameterError, ModelNotFoundError
from ember.gguf import open_gguf
from ember.model.config import config_from_metadata
from ember.model.loader import load_transformer
from ember.runtime import default_threads, keep_buffers_in_heap, release_free_heap, single_threaded
from ember.store import ResolvedModel
from ember.tokenizer import Tokenizer
from ember.tokenizer.chat_template import ChatTemplate, select_template

DEFAULT_MODEL = "smollm2"
DEFAULT_CTX = 4096  # as Ollama: a modest default; the file's training context may be far larger
_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


def _resolve(model: str | os.PathLike) -> "ResolvedModel":
    from ember.store import resolve_model

    return resolve_model(model if isinstance(model, Path) else str(model))


class Model:
    def __init__(
        self,
        path: Path,
        name: str,
        n_ctx: int | None = None,
        threads: int | None = None,
        template: str | None = None,
        system: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        draft: str | os.PathLike | None = None,
        speculative: str | None = None,
    ):
        t0 = time.perf_counter()
        torch.set_num_threads(threads or default_threads())
        self.path = path
        self.name = name
        self.system = system  # default system prompt (from a Modelfile/manifest), used when a chat has none
        self.defaults = dict(defaults or {})  # default options (manifest params), overridden per call
        self.file = open_gguf(path)
        # Architecture first: an unsupported model should be named as such, not fail in its tokenizer.
        config = config_from_metadata(self.file.metadata)
        self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
        if self.tokenizer.vocab_size != config.n_vocab:
            raise GGUFError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model expects {config.n_vocab}"
            )
        train_ctx = self.file.metadata.get(f"{self.file.architecture}.context_length", DEFAULT_CTX)
        self.n_ctx = int(n_ctx or min(DEFAULT_CTX, int(train_ctx)))
        if self.n_ctx < 8:
            raise InvalidParameterError(f"context length {self.n_ctx} is too small")
        keep_buffers_in_heap()
        with single_threaded():
            self.model = load_transformer(self.file, self.n_ctx, config)
        # The weights now live in repacked copies: let go of load-time heap and of the file's resident pages
        # (embedding rows are read from the map again on demand). SmolLM2 steady RSS 541 -> 389 MiB.
        release_free_heap()
        self.file.drop_resident_pages()
        self.config = self.model.config
        self.template: ChatTemplate = select_template(self.file.metadata, self.file.architecture)
        if template:
            self.template = ChatTemplate(template, self.template.bos_token, self.template.eos_token)
        # One engine serves this model's every request (API, CLI, server): paged KV cache with prefix
        # caching, so a chat's next turn reuses the KV of the conversation so far.
        c = self.config
        kv_per_token = c.n_layer * c.n_head_kv * (c.head_dim + c.value_dim) * 2
        # Speculative decoding: a draft model (DRAFT in the Modelfile, or `draft=`) implies method "draft";
        # "ngram" (prompt lookup) needs no second model.
        self.draft: Model | None = None
        if draft is not None and speculative not in (None, "draft"):
            raise InvalidParameterError(f"a draft model was given but the speculative method is {speculative!r}")
        method = speculative or ("draft" if draft is not None else "none")
        if method == "draft":
            if draft is None:
                raise InvalidParameterError("speculative method 'draft' needs a draft model (DRAFT or --draft)")
            self.draft = load(draft, n_ctx=self.n_ctx, threads=threads)
            if self.draft.tokenizer.vocab_size != self.tokenizer.vocab_size:
                raise InvalidParameterError(
                    f"draft model {self.draft.name} has {self.draft.tokenizer.vocab_size} tokens, the model "
                    f"{self.tokenizer.vocab_size}: a draft must share the model's vocabulary")
        spec = SpeculativeConfig(method=method,
                                 num_tokens=int(self.defaults.pop("draft_num_predict", DEFAULT_DRAFT_TOKENS)))
        self.engine = Engine(
            self.model,
            self.tokenizer,
            # room for two full contexts: the conversation, and a second request or cached prefixes
            EngineConfig(max_model_len=self.n_ctx, kv_cache_bytes=2 * self.n_ctx * kv_per_token, speculative=spec),
            draft_model=self.draft.model if self.draft is not None else None,
        )
        self.load_seconds = time.perf_counter() - t0

    # -- description ------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.config.architecture

    def info(self) -> dict[str, Any]:
        md = self.file.metadata
        n_params = sum(t.n_elements for t in self.file.tensors.values())
        types: dict[str, int] = {}
        for t in self.file.tensors.values():
            types[t.type_name] = types.get(t.type_name, 0) + t.n_elements
        return {
            "name": self.name,
            "path": str(self.path),
            "architecture": self.architecture,
            "parameters": n_params,
            "context_length": int(md.get(f"{self.architecture}.context_length", 0)),
            "n_ctx": self.n_ctx,
            "embedding_length": self.config.n_embd,
            "quantization": _file_type_name(md.get("general.file_type"), types),
            "file_size": self.file.file_size,
            "vocab_size": self.tokenizer.vocab_size,
            "chat_template": self.template.source,
        }

    # -- tokens -----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- scoring ----------------------------------------------------------------------------------------
    def logits(
        self, ids: Sequence[int], all_positions: bool = False, rows: Sequence[int] | None = None
    ) -> np.ndarray:
        """Logits after `ids` from an empty context: [vocab] for the last position, [len(ids), vocab] with
        all_positions, or [len(rows), vocab] for the given positions (perplexity scores only some, and the
        vocabulary projection is most of the cost)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        last_only = rows is None and not all_positions
        if rows is None:
            rows = range(len(ids)) if all_positions else [len(ids) - 1]
        wanted = torch.tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
        if len(wanted) and not (0 <= int(wanted[0]) and int(wanted[-1]) < len(ids)):
            raise InvalidParameterError("logit rows must be positions of the given ids")
        cache = self.model.new_cache(len(ids))
        outs = []
        for start in range(0, len(ids), 512):
            chunk = ids[start : start + 512]
            local = wanted[(wanted >= start) & (wanted < start + len(chunk))] - start
            out = self.model.forward(
                torch.tensor(chunk), torch.arange(start, start + len(chunk)), cache, logit_rows=local
            )
            outs.append(out)
        result = torch.cat(outs).numpy()
        if [int(r) for r in rows] != wanted.tolist():  # restore the caller's order and repeats
            index = {r: i for i, r in enumerate(wanted.tolist())}
            result = result[[index[int(r)] for r in rows]]
        return result[-1] if last_only else result

    def _check_ids(self, ids: Sequence[int]) -> None:
        n_vocab = self.config.n_vocab
        if not ids:
            raise InvalidParameterError("the prompt is empty")
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens does not fit the context window of {self.n_ctx} tokens"
            )

    # -- generation -------------------------------------------------------------------------------------
    def _options(self, kwargs: Mapping[str, Any]) -> GenerationOptions:
        kwargs = {**self.defaults, **kwargs}
        max_tokens = kwargs.pop("max_tokens", None)
        draft_num_predict = kwargs.pop("draft_num_predict", None)
        stop = kwargs.pop("stop", None) or ()
        if isinstance(stop, str):
            stop = (stop,)
        unknown = set(kwargs) - _SAMPLING_FIELDS
        if unknown:
            raise InvalidParameterError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return GenerationOptions(max_tokens=max_tokens, stop=tuple(stop), sampling=SamplingParams(**kwargs),
                                 draft_num_predict=draft_num_predict)

    def generate(
        self, prompt: str | Sequence[int], stream: bool = False, **options: Any
    ) -> Completion | TokenStream:
        """Continue a prompt (text, tokenized with special tokens added, or token ids) without a template."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return self._generate(ids, stream, options)

    def chat(self, messages: list[Mapping[str, Any]], stream: bool = False, **options: Any) -> Completion | TokenStream:
        """Answer a conversation formatted by the model's chat template."""
        tools = options.pop("tools", None)
        messages = list(messages)
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system})
        text = self.template.render(messages, add_generation_prompt=True, tools=tools)
        return self._generate(self.prompt_ids(text), stream, options)

    def prompt_ids(self, text: str) -> list[int]:
        """Tokenize a templated prompt: special-token text is parsed, and BOS is not doubled when the template
        already starts with it."""
        bos = self.tokenizer.bos_id
        if bos is not None and self.tokenizer.add_bos:
            bos_text = self.tokenizer.token_text(bos)
            if bos_text and text.startswith(bos_text):
                text = text[len(bos_text) :]
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    def _generate(self, ids: list[int], stream: bool, options: Mapping[str, Any]) -> Completion | TokenStream:
        opts = self._options(options)
        self._check_ids(ids)
        tokens = self.engine.generate_stream(ids, opts)
        if stream:
            return tokens
        for _ in tokens:
            pass
        assert tokens.result is not None
        tokens.result.stats.load_seconds = self.load_seconds
        return tokens.result

    def close(self) -> None:
        self.file.close()
        if self.draft is not None:
            self.draft.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, architecture={self.architecture!r}, n_ctx={self.n_ctx})"


_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}  # llama.cpp's llama_ftype numbering


def _file_type_name(file_type: Any, types: dict[str, int]) -> str:
    if isinstance(file_type, int) and file_type in _FILE_TYPES:
        return _FILE_TYPES[file_type]
    return max(types, key=types.get) if types else "unknown"


def load(model: str | os.PathLike = DEFAULT_MODEL, *, n_ctx: int | None = None, threads: int | None = None,
         draft: str | os.PathLike | None = None, speculative: str | None = None) -> Model:
    """Load a model by catalogue/store name or GGUF path. Raises EmberError subclasses on bad input.

    speculative: "none", "ngram" (prompt lookup) or "draft"; None: "draft" when the model has a draft
    (`draft=`, or DRAFT in its Modelfile), else none. draft: a draft model name or path overriding DRAFT."""
    r = _resolve(model)
    keys = ("max_tokens", "stop", "draft_num_predict")
    defaults = {k: v for k, v in r.params.items() if k in _SAMPLING_FIELDS or k in keys}
    if draft is None and speculative in (None, "draft") and r.draft_path is not None:
        draft = r.draft_path
    return Model(
        Path(r.path), r.name, n_ctx=n_ctx or r.params.get("num_ctx"), threads=threads,
        template=r.template, system=r.system, defaults=defaults, draft=draft, speculative=speculative,
    )


__all__ = ["load", "Model", "Completion", "TokenStream", "EmberError", "ContextOverflowError"]

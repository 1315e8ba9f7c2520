"""The vocabulary as llama.cpp loads it from GGUF metadata: token texts, scores, attributes, special ids, EOG set.

Mirrors `llama_vocab::impl::load` (src/llama-vocab.cpp, llama.cpp as vendored in llama-cpp-python 0.3.36): the
defaults per tokenizer model, the metadata overrides, and the text-based fix-ups llama.cpp applies on top (EOT/FIM
detection, "unused" control tokens, the end-of-generation set, per-model strip attributes).

Token attributes (llama_token_attr bits) and how GGUF token types map onto them:

| tokenizer.ggml.token_type | attribute    | bit   |
|---------------------------|--------------|-------|
| 0 undefined / other       | UNDEFINED    | 0     |
| 2 unknown                 | UNKNOWN      | 1     |
| 5 unused                  | UNUSED       | 2     |
| 1 normal (or no types)    | NORMAL       | 4     |
| 3 control                 | CONTROL      | 8     |
| 4 user defined            | USER_DEFINED | 16    |
| 6 byte                    | BYTE         | 32    |
| -                         | LSTRIP       | 128   |
| -                         | RSTRIP       | 256   |

Defaults per `tokenizer.ggml.model` before metadata overrides them:

| model | kind | bos | eos | unk  | add_bos             | add_eos | add_space_prefix |
|-------|------|-----|-----|------|---------------------|---------|------------------|
| llama | spm  | 1   | 2   | 0    | true                | false   | true             |
| gpt2  | bpe  | 11  | 11  | none | per pre-tokenizer   | false   | false            |
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.errors import GGUFError, UnsupportedError
from ember.tokenizer.pretokenize import PreSpec, pre_spec

UNDEFINED = 0
UNKNOWN = 1 << 0
UNUSED = 1 << 1
NORMAL = 1 << 2
CONTROL = 1 << 3
USER_DEFINED = 1 << 4
BYTE = 1 << 5
LSTRIP = 1 << 7
RSTRIP = 1 << 8

_TYPE_TO_ATTR = (UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)

# Tokens that partition out before model tokenization (llama.cpp's cache_special_tokens).
SPECIAL_MASK = CONTROL | USER_DEFINED | UNKNOWN

KEY = "tokenizer.ggml."

# Texts llama.cpp promotes to EOT / EOM / FIM ids when metadata does not name them (and forces to CONTROL).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Texts that end generation (llama.cpp's special_eog_ids text list).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")

# metadata key suffix -> id field; later keys overwrite earlier ones (the deprecated prefix/suffix/middle come last).
_ID_KEYS = (
    ("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
    ("unknown_token_id", "unk"), ("seperator_token_id", "sep"), ("padding_token_id", "pad"),
    ("mask_token_id", "mask"), ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"),
    ("fim_mid_token_id", "fim_mid"), ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"),
    ("fim_sep_token_id", "fim_sep"), ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"),
    ("middle_token_id", "fim_mid"),
)


@dataclass
class Vocab:
    kind: str                       # "spm" or "bpe"
    tokens: list[str]               # id -> text as stored ("[EMPTY_i]" for empty strings, as llama.cpp)
    scores: list[float]             # id -> score (0.0 when the file has none)
    attrs: list[int]                # id -> attribute bits
    token_to_id: dict[str, int]     # text -> id; for duplicated texts the last id wins, as in llama.cpp
    ids: dict[str, int | None]      # "bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask", "fim_*"
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    pre: PreSpec | None             # BPE only
    merges: Sequence[str] = ()      # BPE only
    eog_ids: frozenset[int] = frozenset()
    special_order: list[int] = field(default_factory=list)  # partition order: longest text first

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _get(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return md.get(KEY + key, default)


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):  # tolerate stringly-typed metadata ("true"/"false")
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def load_vocab(md: Mapping[str, Any]) -> Vocab:
    """Build the vocabulary from GGUF metadata (keys tokenizer.ggml.*), as llama.cpp does."""
    model = _get(md, "model")
    if model is None:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.model")
    pre_name = _get(md, "pre", "") or ""
    ids: dict[str, int | None] = {name: None for _, name in _ID_KEYS}
    pre: PreSpec | None = None
    merges: Sequence[str] = ()
    if model == "llama":
        kind = "spm"
        ids.update(bos=1, eos=2, unk=0)
        add_bos, add_eos, add_space_prefix = True, False, True
    elif model == "gpt2":
        kind = "bpe"
        merges = _get(md, "merges")
        if merges is None:
            raise GGUFError("GGUF tokenizer 'gpt2' has no tokenizer.ggml.merges")
        ids.update(bos=11, eos=11)
        pre = pre_spec(pre_name)
        if pre.bos_disabled:
            ids["bos"] = None
        add_bos, add_eos, add_space_prefix = pre.add_bos, False, False
    else:
        raise UnsupportedError(f"tokenizer model '{model}' is not supported (only 'llama' and 'gpt2')")
    if _get(md, "add_space_prefix") is not None:
        add_space_prefix = _as_bool(_get(md, "add_space_prefix"))

    raw_tokens = _get(md, "tokens")
    if raw_tokens is None:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.tokens")
    tokens = [t if isinstance(t, str) else bytes(t).decode("utf-8", "replace") for t in raw_tokens]
    n = len(tokens)
    token_to_id = dict(zip(tokens, range(n)))
    if "" in token_to_id:  # llama.cpp renames empty tokens so that every id has a distinct text
        del token_to_id[""]
        for i, t in enumerate(tokens):
            if not t:
                tokens[i] = f"[EMPTY_{i}]"
                token_to_id[tokens[i]] = i

    raw_scores = _get(md, "scores")
    if raw_scores is None:
        scores = [0.0] * n
    else:
        scores = [float(s) for s in _as_list(raw_scores)]
        if len(scores) < n:
            raise GGUFError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    raw_types = _get(md, "token_type")
    if raw_types is None:
        attrs = [NORMAL] * n
    else:
        types = _as_list(raw_types)
        if len(types) < n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        table = _TYPE_TO_ATTR
        attrs = [table[t] if 0 <= t < 7 else UNDEFINED for t in types[:n]]

    # Special ids: defaults outside the vocabulary are disabled; metadata ids outside it are ignored.
    for name, value in ids.items():
        if value is not None and value >= n:
            ids[name] = None
    for suffix, name in _ID_KEYS:
        value = _get(md, suffix)
        if value is not None and 0 <= int(value) < n:
            ids[name] = int(value)

    if _get(md, "add_bos_token") is not None:
        add_bos = _as_bool(_get(md, "add_bos_token"))
    if _get(md, "add_eos_token") is not None:
        add_eos = _as_bool(_get(md, "add_eos_token"))

    # Text-based detection of EOT / EOM / FIM ids. llama.cpp takes the first hit in unordered_map order, which
    # is unspecified; Ember takes the lowest id among the texts present (they almost never coexist).
    def detect(name: str, texts: Sequence[str]) -> None:
        if ids[name] is not None:
            return
        found = [token_to_id[t] for t in texts if t in token_to_id]
        if found:
            ids[name] = min(found)
            attrs[ids[name]] |= CONTROL

    detect("eot", _EOT_TEXTS)
    detect("eom", _EOM_TEXTS)
    for name, texts in _FIM_TEXTS.items():
        detect(name, texts)

    # Control tokens named "...unused..." are unused.
    special = [i for i, a in enumerate(attrs) if a & SPECIAL_MASK]
    for i in special:
        if attrs[i] & CONTROL and "unused" in tokens[i]:
            attrs[i] |= UNUSED

    eog: set[int] = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for text in EOG_TEXTS:
        i = token_to_id.get(text)
        if i is not None:
            eog.add(i)
            attrs[i] |= CONTROL
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        i = token_to_id.get(text)
        if i is not None:
            attrs[i] = USER_DEFINED
    eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
    texts_in_eog = {tokens[i]: i for i in eog}
    end_id = texts_in_eog.get("<|end|>")
    has_call = "<|call|>" in texts_in_eog or "<|calls|>" in texts_in_eog
    if end_id is not None and has_call and ("<|return|>" in texts_in_eog or "<|flush|>" in texts_in_eog):
        eog.discard(end_id)  # o200k_harmony / solar-open: <|end|> ends a message, not generation
        attrs[end_id] = USER_DEFINED
    s_id = texts_in_eog.get("</s>")
    if s_id is not None and ("<|tool_response>" in texts_in_eog or "<|plamo:eos|>" in texts_in_eog):
        eog.discard(s_id)  # gemma4 / plamo: </s> is an ordinary token
        attrs[s_id] = NORMAL

    # Partition order: every control / user-defined / unknown token, longest (in UTF-8 bytes) first. llama.cpp
    # uses an unstable std::sort; equal lengths are ordered by id here.
    special = [i for i, a in enumerate(attrs) if a & SPECIAL_MASK]
    special.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))

    _apply_strip_attrs(md, pre_name, tokens, token_to_id, attrs, special)

    return Vocab(kind=kind, tokens=tokens, scores=scores, attrs=attrs, token_to_id=token_to_id, ids=ids,
                 add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix, pre=pre, merges=merges,
                 eog_ids=frozenset(eog), special_order=special)


def _apply_strip_attrs(md: Mapping[str, Any], pre_name: str, tokens: list[str], token_to_id: dict[str, int],
                       attrs: list[int], special: list[int]) -> None:
    """llama.cpp's per-model LSTRIP/RSTRIP attributes (GGUF does not carry them): whitespace next to these
    special tokens is swallowed when they are parsed out of text."""
    name = str(md.get("general.name", "")).lower()
    arch = str(md.get("general.architecture", ""))

    def set_attr(text: str, bit: int, on: bool) -> None:
        i = token_to_id.get(text)
        if i is not None:
            attrs[i] = attrs[i] | bit if on else attrs[i] & ~bit

    if any(s in pre_name for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        set_attr("<mask>", LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for i in special:
            attrs[i] |= RSTRIP
        set_attr("</s>", RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(text, RSTRIP, False)
    elif "modern-bert" in name:
        set_attr("[MASK]", LSTRIP, True)

"""Tokenizers built from GGUF metadata alone, matching llama.cpp (as vendored in llama-cpp-python 0.3.36) token
for token.

| tokenizer.ggml.model | algorithm                      | module   |
|----------------------|--------------------------------|----------|
| gpt2                 | byte-level BPE with regex split | bpe.py, pretokenize.py |
| llama                | SentencePiece BPE, byte fallback | spm.py   |

encode(): special tokens are cut out of the text first (special.py), then each raw piece goes through the model;
BOS/EOS are added as metadata says when add_special. decode(): the concatenated bytes of each token's piece
(llama.cpp's token_to_piece), read as UTF-8 with invalid bytes replaced.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ember.errors import GGUFError, InvalidParameterError
from ember.tokenizer.bpe import CHAR_TO_BYTE, BpeModel
from ember.tokenizer.pretokenize import PreTokenizer
from ember.tokenizer.special import SpecialPartitioner
from ember.tokenizer.spm import SPACE, SpmModel
from ember.tokenizer.stream import StreamDecoder
from ember.tokenizer.vocab import (BYTE, CONTROL, NORMAL, SPECIAL_MASK, UNKNOWN, USER_DEFINED, Vocab,
                                   load_vocab)

__all__ = ["Tokenizer", "StreamDecoder"]


class Tokenizer:
    """A model's tokenizer. Build with Tokenizer.from_metadata(gguf_metadata)."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.vocab_size: int = vocab.n_tokens
        self.bos_id: int | None = vocab.ids["bos"]
        self.eos_id: int | None = vocab.ids["eos"]
        self.eot_id: int | None = vocab.ids["eot"]
        self.unk_id: int | None = vocab.ids["unk"]
        self.pad_id: int | None = vocab.ids["pad"]
        self.eog_ids: frozenset[int] = vocab.eog_ids
        self.add_bos: bool = vocab.add_bos
        self.add_eos: bool = vocab.add_eos
        self.special_ids: frozenset[int] = frozenset(vocab.special_order)
        self._partitioner = SpecialPartitioner(vocab)
        self._pieces: dict[int, bytes] = {}  # id -> token_to_bytes(id, special=True), filled on use
        if vocab.kind == "bpe":
            assert vocab.pre is not None
            self._model: BpeModel | SpmModel = BpeModel(vocab.token_to_id, vocab.merges,
                                                        PreTokenizer(vocab.pre.variant), vocab.pre.ignore_merges)
        else:
            t2i = vocab.token_to_id
            byte_ids: list[int | None] = []
            for b in range(256):
                tid = t2i.get(f"<0x{b:02X}>")
                if tid is None and b < 0x80:
                    tid = t2i.get(chr(b))  # llama.cpp's fallback: the byte itself as a text
                if tid is None:
                    tid = self.unk_id  # llama.cpp would abort here; Ember degrades to <unk>
                byte_ids.append(tid)
            self._model = SpmModel(vocab.tokens, t2i, vocab.scores, byte_ids)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (keys "tokenizer.ggml.*"; arrays as numpy arrays or lists)."""
        return cls(load_vocab(metadata))

    # -- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special, parse_special) returns them."""
        text = _valid_utf8(text)
        v = self.vocab
        out: list[int] = []
        if add_special and v.add_bos:
            if self.bos_id is None:
                raise GGUFError("the model asks for a BOS token but defines none")
            out.append(self.bos_id)
        fragments = self._partitioner.partition(text, parse_special)
        model = self._model
        if v.kind == "spm":
            prev_special = True  # a space prefix goes before the first raw fragment and after each special token
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if v.add_space_prefix and prev_special:
                        frag = " " + frag
                    model.encode(frag.replace(" ", SPACE), out)
                    prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    model.encode(frag, out)
        if add_special and v.add_eos:
            if self.eos_id is None:
                raise GGUFError("the model asks for an EOS token but defines none")
            out.append(self.eos_id)
        return out

    # -- decoding -----------------------------------------------------------------------------------------------

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise InvalidParameterError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    def token_to_bytes(self, id: int, special: bool = True) -> bytes:
        """llama.cpp's token_to_piece as raw bytes: control and unknown tokens render only when `special`."""
        attr = self.vocab.attrs[self._check(id)]
        if not special and attr & (CONTROL | UNKNOWN):
            return b""
        piece = self._pieces.get(id)
        if piece is None:
            piece = self._pieces[id] = self._render(id, attr)
        return piece

    def _render(self, tid: int, attr: int) -> bytes:
        text = self.vocab.tokens[tid]
        if attr & (CONTROL | UNKNOWN | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            if self.vocab.kind == "spm":
                return text.replace(SPACE, " ").encode("utf-8")
            return _gpt2_decode(text)
        if attr & BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens have no text

    def decode(self, ids: Sequence[int], special: bool = True) -> str:
        """The text of `ids`: their pieces concatenated, invalid UTF-8 replaced by U+FFFD."""
        return b"".join(self.token_to_bytes(int(i), special) for i in ids).decode("utf-8", "replace")

    def token_text(self, id: int) -> str:
        """The vocabulary string of a token, as stored (e.g. "Ġthe", "▁the", "<0x0A>")."""
        return self.vocab.tokens[self._check(id)]

    def is_control(self, id: int) -> bool:
        return bool(self.vocab.attrs[self._check(id)] & CONTROL)

    def is_special(self, id: int) -> bool:
        """Control, user-defined or unknown: the tokens that are matched in text before model tokenization."""
        return bool(self.vocab.attrs[self._check(id)] & SPECIAL_MASK)

    def is_eog(self, id: int) -> bool:
        return id in self.eog_ids

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        """An incremental decoder that only ever returns whole characters."""
        return StreamDecoder(self.token_to_bytes, special)


def _valid_utf8(text: str) -> str:
    # llama.cpp receives bytes; a Python str may hold lone surrogates that UTF-8 cannot encode. They become U+FFFD,
    # as llama.cpp's UTF-8 decoder turns invalid sequences into U+FFFD.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _gpt2_decode(text: str) -> bytes:
    """Bytes of a byte-level BPE token. A character outside GPT-2's byte alphabet renders as llama.cpp renders it:
    "[UNK_BYTE_0x<its utf-8 hex>" + the whole token text + "]"."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += f"[UNK_BYTE_0x{ch.encode('utf-8').hex()}{text}]".encode("utf-8")
    return bytes(out)

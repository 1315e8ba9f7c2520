"""Incremental detokenization for streaming output.

A token's bytes need not end on a character boundary: byte-fallback tokens (<0xF0> <0x9F> <0xA6> <0x99>) and
byte-level BPE pieces both split multi-byte UTF-8 characters. StreamDecoder holds back an incomplete trailing
sequence until the bytes that complete it arrive, so every string it returns is whole characters.

Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, special) for any ids, because both
decode the same byte string with UTF-8 and errors="replace" (an incremental decoder replaces exactly the bytes a
one-shot decode would).
"""
from __future__ import annotations

import codecs
from typing import Callable


class StreamDecoder:
    def __init__(self, token_to_bytes: Callable[[int, bool], bytes], special: bool = False) -> None:
        self._token_to_bytes = token_to_bytes
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; returns the text completed by it (possibly "")."""
        return self._decoder.decode(self._token_to_bytes(token_id, self._special), final=False)

    def flush(self) -> str:
        """End of stream: returns what was held back, with an incomplete trailing sequence replaced by U+FFFD.
        The decoder is reset and can be reused."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

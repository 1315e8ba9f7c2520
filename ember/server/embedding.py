"""Embeddings for both dialects: one vector per input, computed off the event loop, optionally shortened."""
from __future__ import annotations

import math
from typing import Any

import anyio

from ember.server.models import LoadedModel


async def embed_all(lm: LoadedModel, inputs: list[Any], truncate: bool, dims: int | None
                    ) -> tuple[list[list[float]], int]:
    """(vectors, total input tokens) for text or token-id inputs; `truncate` cuts inputs longer than the
    context instead of failing; `dims` keeps that many leading components (see `shorten`)."""
    vectors, total = [], 0
    for item in inputs:
        vec, n = await anyio.to_thread.run_sync(lm.embed, item, truncate)
        if dims is not None:
            vec = shorten(vec, dims)
        vectors.append(vec)
        total += n
    return vectors, total


def shorten(vec: list[float], dims: int) -> list[float]:
    """First `dims` components, renormalized (Matryoshka-style, as Ollama and OpenAI's `dimensions`)."""
    head = vec[:dims]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


__all__ = ["embed_all", "shorten"]

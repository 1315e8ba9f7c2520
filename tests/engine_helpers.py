"""Shared by the engine tests: drive an Engine by hand until every request has finished."""
from __future__ import annotations


def run_all(engine, prompts, options):
    """Add every prompt, step until done; returns each request's final RequestOutput, in prompt order."""
    rids = [engine.add_request(p, o) for p, o in zip(prompts, options)]
    final = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[r] for r in rids]

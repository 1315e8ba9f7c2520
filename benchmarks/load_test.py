"""Load test for `ember serve`: N concurrent streaming clients, a bounded number of requests, then a report.

    python benchmarks/load_test.py                                  # starts a server in-process (smollm2)
    python benchmarks/load_test.py --url http://127.0.0.1:11434 --concurrency 8 --requests 32 --api openai

Reports request latency, time to first token and inter-token gaps (p50/p90/p99), aggregate generated tokens/s,
and how many requests were refused (503) or failed. Only loopback servers are accepted: this is a tool for
measuring your own machine, and it stops by itself (bounded request count and a wall-clock limit).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx


@dataclass
class Result:
    ok: bool
    status: int
    latency: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def _request(api: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    if api == "openai":
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": max_tokens, "stream": True, "temperature": 0.7}
    return "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                         "options": {"num_predict": max_tokens, "temperature": 0.7}}


def _pieces(api: str, line: str) -> tuple[int, bool]:
    """(text pieces in this line, done?) for one NDJSON line or SSE event line."""
    if api == "openai":
        if not line.startswith("data: "):
            return 0, False
        data = line[len("data: "):]
        if data == "[DONE]":
            return 0, True
        obj = json.loads(data)
        return sum(1 for c in obj.get("choices", []) if c.get("delta", {}).get("content")), False
    obj = json.loads(line)
    return int(bool(obj.get("message", {}).get("content"))), bool(obj.get("done"))


async def one(client: httpx.AsyncClient, api: str, model: str, prompt: str, max_tokens: int) -> Result:
    path, body = _request(api, model, prompt, max_tokens)
    start = time.perf_counter()
    last = None
    result = Result(ok=False, status=0)
    try:
        async with client.stream("POST", path, json=body) as r:
            result.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return result
            async for line in r.aiter_lines():
                if not line.strip():
                    continue
                n, done = _pieces(api, line)
                if n:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += n
                if done:
                    break
        result.ok = True
    except httpx.HTTPError:
        result.ok = False
    result.latency = time.perf_counter() - start
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(url: str, api: str, model: str, concurrency: int, requests: int, max_tokens: int,
              time_limit: float, api_key: str | None) -> tuple[list[Result], float]:
    """The results and the wall time of the measured part (after the warm-up request)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = ["Why is the sky blue?", "Write a haiku about autumn.", "What is a prime number?",
               "Describe a cat in two sentences."]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[Result] = []
    deadline = time.monotonic() + time_limit

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=time_limit) as client:
        # Warm-up: the model loads once, outside the measurement.
        await one(client, api, model, "Hi", 1)

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one(client, api, model, prompts[i % len(prompts)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), time_limit + 30)
    return results, time.perf_counter() - t0


def report(results: list[Result], wall: float) -> str:
    ok = [r for r in results if r.ok]
    busy = sum(1 for r in results if r.status == 503)
    failed = len(results) - len(ok) - busy
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    rows = [
        f"requests: {len(results)} ok, {busy} refused (503), {failed} failed, in {wall:.2f} s",
        f"generated: {tokens} pieces, {tokens / wall:.1f} /s aggregate" if wall > 0 else "",
    ]
    for label, values in (("latency", lat), ("TTFT", ttft), ("inter-token", gaps)):
        if values:
            rows.append(f"{label:<12} p50 {_pct(values, .5) * 1e3:8.1f} ms   p90 {_pct(values, .9) * 1e3:8.1f} ms   "
                        f"p99 {_pct(values, .99) * 1e3:8.1f} ms   mean {statistics.fmean(values) * 1e3:8.1f} ms")
    return "\n".join(r for r in rows if r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (loopback only); default: start one in this process")
    p.add_argument("--api", choices=("ollama", "openai"), default="ollama")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=300.0, help="stop after this many seconds")
    p.add_argument("--threads", type=int, help="torch threads for the in-process server")
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    if not (1 <= args.concurrency <= 256 and 1 <= args.requests <= 10_000):
        p.error("concurrency must be 1..256 and requests 1..10000")

    server = None
    url = args.url
    if url is None:
        from ember.server.app import ServerConfig, start_in_thread

        server = start_in_thread(ServerConfig(threads=args.threads, access_log=False))
        url = server.url
    elif not _is_loopback(url):
        print(f"refusing {url}: the load test only targets servers on this machine (loopback)", file=sys.stderr)
        return 2
    try:
        results, wall = asyncio.run(run(url, args.api, args.model, args.concurrency, args.requests,
                                        args.max_tokens, args.time_limit, args.api_key))
        print(report(results, wall))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test for `ember serve`: N concurrent streaming clients, a bounded number of requests, then a report.

    python benchmarks/load_test.py                                  # starts a server in-process (smollm2)
    python benchmarks/load_test.py --url http://127.0.0.1:11434 --pid 1234 --concurrency 32 --requests 256

Phases: one request loads the model; a warm-up round of `concurrency` requests (not measured) lets the
allocators reach their working size; the measured run; then the checks.

Reports request latency, time to first token and inter-token gaps (p50/p90/p99), aggregate generated tokens/s,
how many requests were refused (503) or failed, and:
- the server's RSS after the warm-up round and at the end (max of the samples taken every 0.25 s as well);
  "flat" only when the end is less than 5% above the warm-up value. The server is this process when the load
  test starts it, else the process named by --pid (Linux /proc; without it RSS is not reported);
- `--disconnects K` requests that read two pieces of their stream and then drop the connection; after the run
  /metrics must show no running or waiting sequence and the KV cache usage back at its idle value (read after
  the warm-up), within 15 s. A leak, an error or a failed check makes the exit status 1.
Only loopback servers are accepted: this is a tool for measuring your own machine, and it stops by itself
(bounded request count and a wall-clock limit).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
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
    abandoned: bool = False  # the client dropped the connection on purpose


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


async def one(client: httpx.AsyncClient, api: str, model: str, prompt: str, max_tokens: int,
              abandon_after: int | None = None) -> Result:
    """One streamed request; with `abandon_after`, the connection is dropped after that many pieces."""
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
                if abandon_after is not None and result.tokens >= abandon_after:
                    result.abandoned = True
                    break  # leaving the block closes the connection with the body unread
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


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Checks:
    rss_warm: int | None = None  # after the warm-up round
    rss_end: int | None = None  # after the run and the idle check
    rss_peak: int | None = None
    kv_idle: float | None = None  # KV usage when idle after the warm-up
    kv_end: float | None = None
    running_end: float | None = None  # running + waiting sequences after the run
    idle_ok: bool = False


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each metric over its label sets (one model in this test)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except (ValueError, IndexError):
            continue
    return out


async def _idle_metrics(client: httpx.AsyncClient, kv_idle: float | None, timeout: float) -> tuple[bool, dict]:
    """Poll /metrics until no sequence runs or waits and KV usage is back to `kv_idle` (if given)."""
    deadline = time.monotonic() + timeout
    m: dict[str, float] = {}
    while True:
        m = parse_metrics((await client.get("/metrics")).text)
        busy = m.get("ember_running_sequences", 0.0) + m.get("ember_queue_depth", 0.0)
        kv = m.get("ember_kv_cache_usage_ratio", 0.0)
        if busy == 0 and (kv_idle is None or kv <= kv_idle + 1e-9):
            return True, m
        if time.monotonic() > deadline:
            return False, m
        await asyncio.sleep(0.1)


async def run(url: str, api: str, model: str, concurrency: int, requests: int, max_tokens: int,
              time_limit: float, api_key: str | None, disconnects: int = 0, pid: int | None = None
              ) -> tuple[list[Result], float, Checks]:
    """The results and the wall time of the measured part (after the warm-up), and the checks."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = ["Why is the sky blue?", "Write a haiku about autumn.", "What is a prime number?",
               "Describe a cat in two sentences."]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    # The requests that drop their connection, spread over the run.
    abandon = {i * requests // disconnects for i in range(disconnects)} if disconnects else set()
    results: list[Result] = []
    checks = Checks()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=time_limit, limits=limits) as client:
        # Warm-up: the model loads, then one concurrent round, both outside the measurement.
        await one(client, api, model, "Hi", 1)
        await asyncio.gather(*(one(client, api, model, prompts[i % len(prompts)], max_tokens)
                               for i in range(concurrency)))
        ok, m = await _idle_metrics(client, None, 15.0)
        checks.kv_idle = m.get("ember_kv_cache_usage_ratio")
        if pid is not None:
            checks.rss_warm = checks.rss_peak = rss_bytes(pid)
        deadline = time.monotonic() + time_limit

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one(client, api, model, prompts[i % len(prompts)], max_tokens,
                                         2 if i in abandon else None))

        async def sample_rss() -> None:
            while pid is not None:
                rss = rss_bytes(pid)
                if rss is not None:
                    checks.rss_peak = max(checks.rss_peak or 0, rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), time_limit + 30)
            wall = time.perf_counter() - t0
            checks.idle_ok, m = await _idle_metrics(client, checks.kv_idle, 15.0)
        finally:
            sampler.cancel()
        checks.kv_end = m.get("ember_kv_cache_usage_ratio")
        checks.running_end = m.get("ember_running_sequences", 0.0) + m.get("ember_queue_depth", 0.0)
        if pid is not None:
            checks.rss_end = rss_bytes(pid)
    return results, wall, checks


def rss_flat(checks: Checks) -> bool | None:
    if not checks.rss_warm or checks.rss_end is None:
        return None
    return checks.rss_end < checks.rss_warm * 1.05


def report(results: list[Result], wall: float, checks: Checks | None = None) -> str:
    dropped = [r for r in results if r.abandoned]
    results = [r for r in results if not r.abandoned]
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
    if checks is not None:
        if checks.rss_warm is not None and checks.rss_end is not None:
            mib = 1 << 20
            growth = (checks.rss_end / checks.rss_warm - 1) * 100
            rows.append(f"RSS: {checks.rss_warm / mib:.1f} MiB after warm-up, {checks.rss_end / mib:.1f} MiB at the end "
                        f"({growth:+.1f}%), peak {(checks.rss_peak or 0) / mib:.1f} MiB: "
                        + ("flat" if rss_flat(checks) else "NOT flat (>= 5% growth)"))
        else:
            rows.append("RSS: not measured (give --pid for a server started elsewhere; Linux only)")
        rows.append(f"disconnects: {len(dropped)} clients dropped their stream mid-way; after the run "
                    f"{checks.running_end:g} sequences running or waiting, KV usage {checks.kv_end} "
                    f"(idle {checks.kv_idle}): " + ("back to idle" if checks.idle_ok else "NOT back to idle"))
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
    p.add_argument("--disconnects", type=int, default=4, help="requests that drop their stream mid-way")
    p.add_argument("--pid", type=int, help="the server's process id, for RSS (default: this process when "
                                           "the load test starts the server)")
    args = p.parse_args(argv)
    if not (1 <= args.concurrency <= 256 and 1 <= args.requests <= 10_000):
        p.error("concurrency must be 1..256 and requests 1..10000")
    if not 0 <= args.disconnects <= args.requests:
        p.error("disconnects must be between 0 and the number of requests")

    server = None
    url = args.url
    if url is None:
        from ember.server.app import ServerConfig, start_in_thread

        server = start_in_thread(ServerConfig(threads=args.threads, access_log=False))
        url = server.url
        pid = os.getpid()
    elif not _is_loopback(url):
        print(f"refusing {url}: the load test only targets servers on this machine (loopback)", file=sys.stderr)
        return 2
    else:
        pid = args.pid
    try:
        results, wall, checks = asyncio.run(run(url, args.api, args.model, args.concurrency, args.requests,
                                                args.max_tokens, args.time_limit, args.api_key,
                                                args.disconnects, pid))
        print(report(results, wall, checks))
    finally:
        if server is not None:
            server.stop()
    failed = sum(1 for r in results if not r.ok and not r.abandoned)
    return 0 if failed == 0 and checks.idle_ok and rss_flat(checks) is not False else 1


if __name__ == "__main__":
    sys.exit(main())

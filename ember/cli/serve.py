"""`ember serve`, `ember ps`, `ember stop MODEL`: the server and the two commands that ask it about its models.

    ember serve                      # 127.0.0.1:11434, or EMBER_HOST; other settings: see ember/server/app.py
    ember ps                         # NAME  ID  SIZE  PROCESSOR  CONTEXT  UNTIL
    ember stop smollm2               # unload now (keep_alive 0), as `ollama stop`
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from datetime import datetime
from typing import Any, TextIO

from ember.errors import EmberError


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", aliases=["start"], parents=parents, help="start the API server",
                           description="Serve Ollama's /api/* and OpenAI's /v1/* on EMBER_HOST "
                                       "(default 127.0.0.1:11434).")
    serve.add_argument("--host", metavar="HOST[:PORT]", help="listen address (overrides EMBER_HOST)")
    serve.add_argument("--threads", type=int, metavar="N", help="torch threads (overrides EMBER_NUM_THREADS)")
    serve.add_argument("--speculative", choices=("none", "ngram", "draft"),
                       help="speculative decoding for every model (overrides EMBER_SPECULATIVE; default: draft "
                            "for models with a DRAFT, else none)")
    serve.set_defaults(handler=serve_command)

    ps = sub.add_parser("ps", parents=parents, help="list the models a running server has loaded",
                        description="List the models loaded by the server at EMBER_HOST.")
    ps.set_defaults(handler=ps_command)

    stop = sub.add_parser("stop", parents=parents, help="unload a model from a running server",
                          description="Unload MODEL from the server at EMBER_HOST now.")
    stop.add_argument("model", metavar="MODEL")
    stop.set_defaults(handler=stop_command)


def serve_command(args: argparse.Namespace) -> int:
    from ember import __version__
    from ember.server import parse_host
    from ember.server.app import ServerConfig, run_server

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"], overrides["port"] = parse_host(args.host)
    if args.threads:
        overrides["threads"] = args.threads
    if args.speculative:
        overrides["speculative"] = args.speculative
    config = ServerConfig.from_env(**overrides)
    # Bind first so a busy port is one clear line, not a server log.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise EmberError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e} "
                         f"(is another server running? set EMBER_HOST to use another address)") from None
    sock.listen(2048)
    print(f"Ember {__version__} listening on http://{config.host}:{config.port}", file=sys.stderr, flush=True)
    run_server(config, sockets=[sock])
    return 0


def _until(expires_at: str, now: float) -> str:
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return expires_at
    left = when - now
    if left > 100 * 365 * 86400:
        return "Forever"
    if left <= 1:
        return "Less than a second from now" if left > 0 else "Stopping..."
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "now"


def ps_command(args: argparse.Namespace | None = None, out: TextIO | None = None) -> int:
    from ember.cli.client import ServerClient
    from ember.cli.list import human_bytes

    out = out or sys.stdout
    models = ServerClient().get("/api/ps").get("models", [])
    now = time.time()
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in models:
        rows.append((m.get("name", ""), m.get("digest", "")[:12], human_bytes(int(m.get("size", 0))), "100% CPU",
                     str(m.get("context_length", "")), _until(m.get("expires_at", ""), now)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        out.write("    ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "    " + r[5] + "\n")
    return 0


def stop_command(args: argparse.Namespace) -> int:
    from ember.cli.client import ServerClient
    from ember.store.names import parse_name

    client = ServerClient()
    wanted = args.model
    try:
        key = parse_name(wanted).display
    except EmberError:
        key = wanted
    loaded = [m.get("name") for m in client.get("/api/ps").get("models", [])]
    if wanted not in loaded and key not in loaded:
        raise EmberError(f"couldn't find model '{wanted}' to stop (loaded: {', '.join(loaded) or 'none'})")
    client.post("/api/generate", {"model": wanted, "keep_alive": 0})
    return 0

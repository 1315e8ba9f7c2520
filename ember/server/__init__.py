"""`ember serve`: an HTTP server speaking Ollama's /api/* and OpenAI's /v1/* over Ember's engine.

    from ember.server import create_app, ServerConfig
    app = create_app(ServerConfig.from_env())         # an ASGI app (Starlette); run it with uvicorn

This module stays import-light (no web framework) so the CLI can find a server without loading one.
"""
from __future__ import annotations

from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434  # Ollama's, so its clients and tools find Ember where they look by default


def parse_host(text: str | None) -> tuple[str, int]:
    """EMBER_HOST as Ollama reads OLLAMA_HOST: "host", "host:port", ":port", "http://host:port", "[::1]:port"."""
    text = (text or "").strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    host, port = text, ""
    if text.startswith("["):  # IPv6 literal
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        from ember.errors import InvalidParameterError

        raise InvalidParameterError(f"invalid port in EMBER_HOST {text!r}")
    return host or DEFAULT_HOST, int(port) if port else DEFAULT_PORT


def base_url(text: str | None) -> str:
    host, port = parse_host(text)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # listening on every address: talk to it over loopback
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServerConfig", "run_server", "start_in_thread"):
        from ember.server import app

        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ServerConfig", "base_url", "create_app", "parse_host", "run_server",
           "start_in_thread"]

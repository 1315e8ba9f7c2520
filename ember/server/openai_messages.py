"""OpenAI chat messages and tools as Ember's chat templates take them.

- roles: "developer" is a system message; content may be a string or a list of text parts (other part types,
  such as images, are a 400);
- an assistant's tool_calls carry their arguments as an object (the Hugging Face template convention), not the
  JSON text OpenAI sends; tool results keep tool_call_id and name;
- tool_choice "none" drops the tools; any other choice behaves as "auto".
"""
from __future__ import annotations

import json
from typing import Any

from ember.server.errors import APIError


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}: content parts of type {kind!r} are not supported (text only)",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def openai_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise APIError(400, f"{where} must be an object with a 'role'", param="messages")
        role = "system" if msg["role"] == "developer" else msg["role"]
        if role not in ("system", "user", "assistant", "tool", "function"):
            raise APIError(400, f"{where}.role {msg['role']!r} is not one of system, developer, user, "
                                f"assistant, tool", param="messages")
        m: dict[str, Any] = {"role": role, "content": _text_content(msg.get("content"), where) or ""}
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise APIError(400, f"{where}.tool_calls must be a list", param="messages")
            converted = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(400, f"{where}.tool_calls entries need function.name", param="messages")
                args = fn.get("arguments") or "{}"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    raise APIError(400, f"{where}.tool_calls arguments are not JSON", param="messages") from None
                # Templates (HF convention) expect arguments as an object.
                converted.append({"id": call.get("id"), "type": "function",
                                  "function": {"name": fn["name"], "arguments": args}})
            m["tool_calls"] = converted
        for key in ("tool_call_id", "name"):
            if isinstance(msg.get(key), str):
                m[key] = msg[key]
        out.append(m)
    return out


def openai_tools(body: dict[str, Any]) -> list | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise APIError(400, "'tools' must be a list of tool objects", param="tools")
    if body.get("tool_choice") == "none":
        return None
    return tools


__all__ = ["openai_messages", "openai_tools"]

"""Tool calls out of generated text, incrementally, so streamed answers carry them too.

Two shapes are recognised:

| shape        | what the model writes                                              | accepted names   |
|--------------|--------------------------------------------------------------------|------------------|
| Hermes tags  | <tool_call>{"name": "f", "arguments": {...}}</tool_call> (1 or more) | any              |
| bare JSON    | the whole answer is {"name": "f", "arguments"/"parameters": {...}}  | the tools given  |
|              | or a list of such objects (Llama 3.x, many small models)           |                  |

Text around Hermes tags stays content. A bare-JSON answer is held back until the end (it can only be judged
whole) and becomes content if it is not a call to one of the offered tools. An unterminated final tag (the
model hit its end-of-generation token before `</tool_call>`) is still parsed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool_names(tools: Iterable[Any] | None) -> set[str]:
    """Function names from OpenAI/Ollama tool definitions ({"type": "function", "function": {"name": ...}})."""
    names = set()
    for tool in tools or ():
        if isinstance(tool, dict):
            fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            if isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return names


def _as_call(obj: Any, known: set[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}} echoed back
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if known is not None and name not in known:
        return None
    return ToolCall(name, args)


def parse_calls(text: str, known: set[str] | None) -> list[ToolCall] | None:
    """`text` as one call or a list of calls, or None if it is not exactly that."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(item, known) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """push(text) -> (content, calls) as text streams in; finish() -> (content, calls) for what is left."""

    def __init__(self, tools: Iterable[Any] | None):
        self.known = tool_names(tools)
        self.mode = "start"  # start (undecided) | text | call (inside a tag) | json (bare JSON candidate)
        self.buf = ""
        self.calls: list[ToolCall] = []  # every call found so far

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self.mode == "start":
                head = self.buf.lstrip()
                if not head:
                    break
                if head[0] in "{[" and self.known:
                    self.mode = "json"
                elif head.startswith(OPEN) or OPEN.startswith(head):
                    if not head.startswith(OPEN):
                        break  # still could be the tag: wait
                    self.buf = head  # whitespace before a call is layout, not content
                    self.mode = "text"
                else:
                    self.mode = "text"
            if self.mode == "json":
                break  # judged whole in finish()
            if self.mode == "text":
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = _held_prefix(self.buf, OPEN)
                    content.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                content.append(self.buf[:i])
                self.buf = self.buf[i + len(OPEN) :]
                self.mode = "call"
            if self.mode == "call":
                j = self.buf.find(CLOSE)
                if j < 0:
                    break
                body, self.buf = self.buf[:j], self.buf[j + len(CLOSE) :]
                parsed = parse_calls(body.strip(), None)
                if parsed is None:
                    content.append(OPEN + body + CLOSE)  # not a call after all: keep the model's words
                else:
                    calls.extend(parsed)
                    self.buf = self.buf.lstrip()  # whitespace between calls is layout, not content
                self.mode = "text"
        self.calls.extend(calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
        if self.mode == "json":
            parsed = parse_calls(self.buf.strip(), self.known)
            if parsed is None:
                content = self.buf
            else:
                calls = parsed
        elif self.mode == "call":
            parsed = parse_calls(self.buf.strip(), None)
            if parsed is None:
                content = OPEN + self.buf
            else:
                calls = parsed
        else:
            content = self.buf if self.mode == "text" or self.buf.strip() else ""
        self.buf = ""
        self.calls.extend(calls)
        return content, calls

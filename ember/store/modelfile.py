"""Modelfile: the text recipe `ember create` builds a model from, in Ollama's syntax.

    # comment
    INSTRUCTION arguments

| instruction              | meaning                                                            | Ember                |
|--------------------------|--------------------------------------------------------------------|----------------------|
| FROM <name or path>      | base: a store model, a .gguf file (relative to the Modelfile), or  | required, once       |
|                          | a blob `sha256:<hex>` already in the store                         |                      |
| PARAMETER <name> <value> | a default option; `stop` may repeat                                | typed table below    |
| TEMPLATE <text>          | chat template overriding the GGUF's own                            | last one wins        |
| SYSTEM <text>            | default system prompt                                              | last one wins        |
| MESSAGE <role> <text>    | conversation history; role is system, user or assistant           | in order             |
| LICENSE <text>           | license text                                                       | may repeat           |
| ADAPTER <path>           | (Q)LoRA adapter                                                    | rejected: no LoRA    |
| DRAFT <name or path>     | draft model for speculative decoding (same vocabulary, smaller)    | last one wins        |

Instructions are case-insensitive. A value is the rest of the line, or `"..."` on one line (`\\"` and `\\\\`
escapes), or `\"\"\"...\"\"\"` spanning lines (verbatim, no escapes).

PARAMETER names are Ollama's (so a params layer is interchangeable with Ollama's):

| name              | type   | check     | Ember                                         |
|-------------------|--------|-----------|-----------------------------------------------|
| num_ctx           | int    | >= 1      | context window                                |
| num_predict       | int    | >= -2     | max tokens to generate (-1: no limit)         |
| temperature       | float  | >= 0      | sampler                                       |
| top_k             | int    | >= 0      | sampler                                       |
| top_p             | float  | 0..1      | sampler                                       |
| min_p             | float  | 0..1      | sampler                                       |
| typical_p         | float  | 0..1      | sampler                                       |
| repeat_penalty    | float  | > 0       | sampler                                       |
| repeat_last_n     | int    | >= -1     | sampler                                       |
| presence_penalty  | float  |           | sampler                                       |
| frequency_penalty | float  |           | sampler                                       |
| seed              | int    |           | sampler                                       |
| stop              | string | non-empty | stop sequences (repeatable; stored as a list) |
| num_keep          | int    |           | stored, not used                              |
| penalize_newline  | bool   |           | stored, not used                              |
| mirostat          | int    | 0..2      | stored, not used                              |
| draft_num_predict | int    | 0..64     | most tokens drafted per step (speculative)    |
| mirostat_eta      | float  |           | stored, not used                              |
| mirostat_tau      | float  |           | stored, not used                              |
| tfs_z             | float  |           | stored, not used                              |
| num_batch         | int    | >= 1      | stored, not used                              |
| num_gpu           | int    |           | stored, not used                              |
| main_gpu          | int    |           | stored, not used                              |
| num_thread        | int    | >= 0      | stored, not used                              |
| use_mmap          | bool   |           | stored, not used                              |
| numa              | bool   |           | stored, not used                              |
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError

MAX_MODELFILE_BYTES = 16 << 20
ROLES = ("system", "user", "assistant")


class ModelfileError(EmberError):
    """A Modelfile that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Param:
    kind: type  # int, float, bool or str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""


def _between(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


# The table above, as data.
PARAMETERS: dict[str, Param] = {
    "num_ctx": Param(int, lambda v: v >= 1, ">= 1"),
    "num_predict": Param(int, lambda v: v >= -2, ">= -2"),
    "temperature": Param(float, lambda v: v >= 0, ">= 0"),
    "top_k": Param(int, lambda v: v >= 0, ">= 0"),
    "top_p": Param(float, _between(0, 1), "between 0 and 1"),
    "min_p": Param(float, _between(0, 1), "between 0 and 1"),
    "typical_p": Param(float, _between(0, 1), "between 0 and 1"),
    "repeat_penalty": Param(float, lambda v: v > 0, "> 0"),
    "repeat_last_n": Param(int, lambda v: v >= -1, ">= -1"),
    "presence_penalty": Param(float),
    "frequency_penalty": Param(float),
    "seed": Param(int),
    "stop": Param(str, lambda v: v != "", "non-empty"),
    "num_keep": Param(int),
    "penalize_newline": Param(bool),
    "mirostat": Param(int, _between(0, 2), "0, 1 or 2"),
    "draft_num_predict": Param(int, _between(0, 64), "between 0 and 64"),
    "mirostat_eta": Param(float),
    "mirostat_tau": Param(float),
    "tfs_z": Param(float),
    "num_batch": Param(int, lambda v: v >= 1, ">= 1"),
    "num_gpu": Param(int),
    "main_gpu": Param(int),
    "num_thread": Param(int, lambda v: v >= 0, ">= 0"),
    "use_mmap": Param(bool),
    "numa": Param(bool),
}

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "DRAFT")
_REJECTED = {
    "ADAPTER": "ADAPTER is not supported: Ember cannot apply (Q)LoRA adapters yet; merge the adapter into a "
               "GGUF and use FROM",
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Modelfile:
    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)  # stop: list[str]; the rest scalars
    template: str | None = None
    system: str | None = None
    messages: tuple[Message, ...] = ()
    licenses: tuple[str, ...] = ()
    draft: str | None = None  # DRAFT: a store name, a .gguf path or a blob, like FROM
    base_dir: Path | None = None  # where relative FROM paths are resolved (the Modelfile's folder)


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def convert_parameter(name: str, value: Any) -> Any:
    """Check one parameter (a Modelfile string or a JSON value from the API) against the table; return it typed.

    Raises ModelfileError without a line number; the parser adds it."""
    spec = PARAMETERS.get(name)
    if spec is None:
        raise ModelfileError(f"unknown parameter '{name}'{_suggest(name, list(PARAMETERS))}")
    text = value.strip() if isinstance(value, str) else value
    try:
        if spec.kind is bool:
            if isinstance(text, bool):
                out: Any = text
            elif isinstance(text, str) and text.lower() in ("true", "false"):
                out = text.lower() == "true"
            else:
                raise ValueError
        elif spec.kind is int:
            if isinstance(text, bool):
                raise ValueError
            if isinstance(text, float):
                if not text.is_integer():
                    raise ValueError
                text = int(text)
            out = int(text)
        elif spec.kind is float:
            if isinstance(text, bool):
                raise ValueError
            out = float(text)
            if not math.isfinite(out):
                raise ValueError
        else:
            if not isinstance(value, str):
                raise ValueError
            out = value
    except (ValueError, TypeError):
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[spec.kind]
        raise ModelfileError(f"parameter '{name}' must be {kind}, got {value!r}") from None
    if spec.check is not None and not spec.check(out):
        raise ModelfileError(f"parameter '{name}' must be {spec.requirement}, got {value!r}")
    return out


def add_parameter(params: dict[str, Any], name: str, value: Any) -> None:
    """Set `name` in a params dict; `stop` accumulates into a list (a list value adds each)."""
    if name == "stop":
        values = value if isinstance(value, list) else [value]
        params.setdefault("stop", [])
        for v in values:
            s = convert_parameter(name, v)
            if s not in params["stop"]:
                params["stop"].append(s)
    else:
        params[name] = convert_parameter(name, value)


class _Lines:
    def __init__(self, text: str) -> None:
        # Only \n (and \r\n) end a line: splitlines() would also split on characters a template may hold.
        self.lines = text.replace("\r\n", "\n").split("\n")
        self.i = 0  # index of the next line to read

    def fail(self, line_no: int, message: str) -> ModelfileError:
        return ModelfileError(f"Modelfile line {line_no}: {message}")

    def value(self, rest: str, line_no: int, what: str) -> str:
        """The value starting at `rest` (on line `line_no`); triple-quoted values consume following lines."""
        rest = rest.lstrip()
        if rest.startswith('"""'):
            body = rest[3:]
            end = body.find('"""')
            if end >= 0:
                tail = body[end + 3:].strip()
                if tail:
                    raise self.fail(line_no, f'unexpected text after the closing """: {tail!r}')
                return body[:end]
            parts = [body]
            while self.i < len(self.lines):
                line = self.lines[self.i]
                self.i += 1
                end = line.find('"""')
                if end >= 0:
                    tail = line[end + 3:].strip()
                    if tail:
                        raise self.fail(self.i, f'unexpected text after the closing """: {tail!r}')
                    parts.append(line[:end])
                    return "\n".join(parts)
                parts.append(line)
            raise self.fail(line_no, f'{what}: """ is never closed')
        rest = rest.rstrip()
        if rest.startswith('"'):
            out: list[str] = []
            j = 1
            while j < len(rest):
                c = rest[j]
                if c == "\\" and j + 1 < len(rest) and rest[j + 1] in '"\\':
                    out.append(rest[j + 1])
                    j += 2
                    continue
                if c == '"':
                    if rest[j + 1:].strip():
                        raise self.fail(line_no, f"unexpected text after the closing quote: {rest[j + 1:].strip()!r}")
                    return "".join(out)
                out.append(c)
                j += 1
            raise self.fail(line_no, f'{what}: the quote is never closed (use """ for text on several lines)')
        if not rest:
            raise self.fail(line_no, f"{what} needs a value")
        return rest


def _split_word_raw(text: str) -> tuple[str, str]:
    """First word, and the rest unstripped on the right."""
    text = text.lstrip()
    if not text:
        return "", ""
    word = text.split(None, 1)[0]
    return word, text[len(word):]


def parse_modelfile(text: str, base_dir: Path | None = None) -> Modelfile:
    """Parse Modelfile text; raise ModelfileError naming the line of the first problem."""
    src = _Lines(text)
    from_: str | None = None
    from_line = 0
    params: dict[str, Any] = {}
    template = system = draft = None
    messages: list[Message] = []
    licenses: list[str] = []
    while src.i < len(src.lines):
        line_no = src.i + 1
        raw = src.lines[src.i].lstrip()
        src.i += 1
        if not raw.strip() or raw.startswith("#"):
            continue
        word = raw.split(None, 1)[0]
        rest = raw[len(word):]  # unstripped: a triple-quoted value keeps its first line's trailing spaces
        instruction = word.upper()
        if instruction in _REJECTED:
            raise src.fail(line_no, _REJECTED[instruction])
        if instruction not in INSTRUCTIONS:
            raise src.fail(line_no, f"unknown instruction '{word}'{_suggest(instruction, INSTRUCTIONS)}; "
                                    f"expected one of {', '.join(INSTRUCTIONS)}")
        if instruction == "FROM":
            if from_ is not None:
                raise src.fail(line_no, f"FROM given twice (first on line {from_line})")
            from_, from_line = src.value(rest, line_no, "FROM").strip(), line_no
        elif instruction == "PARAMETER":
            name, value_text = _split_word_raw(rest)
            if not name:
                raise src.fail(line_no, "PARAMETER needs a name and a value")
            value = src.value(value_text, line_no, f"PARAMETER {name}")
            try:
                add_parameter(params, name.lower(), value)
            except ModelfileError as e:
                raise src.fail(line_no, str(e)) from None
        elif instruction == "TEMPLATE":
            template = src.value(rest, line_no, "TEMPLATE")
        elif instruction == "SYSTEM":
            system = src.value(rest, line_no, "SYSTEM")
        elif instruction == "LICENSE":
            licenses.append(src.value(rest, line_no, "LICENSE"))
        elif instruction == "DRAFT":
            draft = src.value(rest, line_no, "DRAFT").strip()
            if not draft:
                raise src.fail(line_no, "DRAFT needs a model name or a .gguf path")
        elif instruction == "MESSAGE":
            role, content = _split_word_raw(rest)
            if role.lower() not in ROLES:
                raise src.fail(line_no, f"MESSAGE role must be one of {', '.join(ROLES)}, got '{role}'")
            messages.append(Message(role.lower(), src.value(content, line_no, "MESSAGE")))
    if from_ is None:
        raise ModelfileError("Modelfile has no FROM instruction")
    if not from_:
        raise ModelfileError(f"Modelfile line {from_line}: FROM needs a value")
    return Modelfile(from_=from_, parameters=params, template=template, system=system,
                     messages=tuple(messages), licenses=tuple(licenses), draft=draft, base_dir=base_dir)


def read_modelfile(path: str | Path) -> Modelfile:
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_MODELFILE_BYTES:
            raise ModelfileError(f"{path} is larger than {MAX_MODELFILE_BYTES >> 20} MiB; not a Modelfile")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ModelfileError(f"Modelfile {path} not found") from None
    except IsADirectoryError:
        raise ModelfileError(f"{path} is a directory, not a Modelfile") from None
    except UnicodeDecodeError as e:
        raise ModelfileError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ModelfileError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_modelfile(text, base_dir=path.resolve().parent)


# ---- writing (ember show --modelfile) -------------------------------------------------------------------------


def _escaped(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote(text: str, *, always: bool = False) -> str:
    """A value the parser reads back exactly as `text`."""
    if "\n" not in text and "\r" not in text:
        plain = text and text == text.strip() and '"' not in text and "\\" not in text
        return text if plain and not always else _escaped(text)
    if '"""' in text or text.endswith('"'):
        raise EmberError('a value with several lines that contains """ (or ends in ") cannot be written '
                         "in a Modelfile")
    return f'"""{text}"""'


def format_parameter(name: str, value: Any) -> list[str]:
    out = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, str):
            text = quote(v, always=True)  # stop strings often hold spaces or look like markup
        else:
            text = str(v)
        out.append(f"PARAMETER {name} {text}")
    return out


def format_modelfile(mf: Modelfile, header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"FROM {mf.from_}")
    if mf.draft is not None:
        lines.append(f"DRAFT {mf.draft}")
    if mf.template is not None:
        lines.append(f"TEMPLATE {quote(mf.template)}")
    if mf.system is not None:
        lines.append(f"SYSTEM {quote(mf.system)}")
    for name, value in mf.parameters.items():
        lines += format_parameter(name, value)
    for m in mf.messages:
        lines.append(f"MESSAGE {m.role} {quote(m.content)}")
    for lic in mf.licenses:
        lines.append(f"LICENSE {quote(lic)}")
    return "\n".join(lines) + "\n"


__all__ = [
    "INSTRUCTIONS",
    "PARAMETERS",
    "Message",
    "Modelfile",
    "ModelfileError",
    "add_parameter",
    "convert_parameter",
    "format_modelfile",
    "parse_modelfile",
    "read_modelfile",
]

"""Chat templates: turn a conversation (a list of role/content messages) into the prompt text a model expects.

A GGUF file usually carries its Hugging Face chat template (`tokenizer.chat_template`), a Jinja2 program. We
render it the way transformers does (same sandbox class, options, globals and `tojson`), so a template
produces the same prompt here as in transformers and llama-cpp-python. A file without one gets a built-in
template, written in Jinja to reproduce llama.cpp's hard-coded formats byte for byte.

Rendering runs in the guarded sandbox of template_sandbox.py (its docstring tables the threats and defences);
the built-in templates live in builtin_templates.py. This module holds ChatTemplate and select_template, and
re-exports the public names of the other two so existing imports keep working.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError

from ember.errors import InvalidParameterError, TemplateError
from ember.tokenizer.builtin_templates import ARCHITECTURE_TEMPLATES as ARCHITECTURE_TEMPLATES
from ember.tokenizer.builtin_templates import BUILTIN_TEMPLATES as BUILTIN_TEMPLATES
from ember.tokenizer.builtin_templates import builtin_template as builtin_template
from ember.tokenizer.template_sandbox import EMITTED_FACTOR as EMITTED_FACTOR
from ember.tokenizer.template_sandbox import MAX_INT_BITS as MAX_INT_BITS
from ember.tokenizer.template_sandbox import MAX_RANGE as MAX_RANGE
from ember.tokenizer.template_sandbox import MAX_SOURCE_CHARS as MAX_SOURCE_CHARS
from ember.tokenizer.template_sandbox import RenderLimits as RenderLimits
from ember.tokenizer.template_sandbox import (
    _GLOBAL_NAMES,
    _active,
    _Budget,
    _GuardedEnvironment,
    _Instrument,
    _one_line,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "RenderLimits",
    "builtin_template",
    "select_template",
]


def select_template(metadata: Mapping[str, Any], architecture: str) -> ChatTemplate:
    """The model's own template (GGUF tokenizer.chat_template) if it has one, else the built-in template for
    its architecture, else ChatML. bos/eos text comes from tokenizer.ggml.tokens at the bos/eos token ids."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    bos = _token_text(tokens, metadata.get("tokenizer.ggml.bos_token_id"))
    eos = _token_text(tokens, metadata.get("tokenizer.ggml.eos_token_id"))
    source = metadata.get("tokenizer.chat_template")
    if isinstance(source, bytes):
        source = source.decode("utf-8", errors="replace")
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, bos, eos)
    return ChatTemplate(builtin_template(ARCHITECTURE_TEMPLATES.get(architecture, "chatml")), bos, eos)


def _token_text(tokens: Any, token_id: Any) -> str:
    if tokens is None or token_id is None:
        return ""
    try:
        index = int(token_id)
    except (TypeError, ValueError):
        return ""
    if not 0 <= index < len(tokens):
        return ""
    text = tokens[index]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class ChatTemplate:
    """A compiled chat template. `render` is safe to call from several threads at once."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 limits: RenderLimits | None = None) -> None:
        if not isinstance(source, str):
            raise TemplateError(f"chat template must be a string, not {type(source).__name__}")
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateError(f"chat template is {len(source)} characters, over the {MAX_SOURCE_CHARS} limit")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.limits = limits or RenderLimits()
        env = _GuardedEnvironment()
        try:
            ast = env.parse(source)
            self.supports_tools: bool = "tools" in meta.find_undeclared_variables(ast)
            self._template = env.from_string(_Instrument().visit(ast))
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(_one_line(f"chat template syntax error at line {e.lineno}: {e.message}")) from None
        except jinja2.TemplateError as e:
            raise TemplateError(_one_line(f"chat template does not compile: {e}")) from None

    def __repr__(self) -> str:
        source = _one_line(self.source, 60)
        return f"ChatTemplate({source!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **extra: Any) -> str:
        """Render a conversation. `extra` adds template variables (e.g. enable_thinking, date_string) and may
        override bos_token/eos_token as in transformers; it may not shadow the template globals."""
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise InvalidParameterError("messages must be a list of {'role': ..., 'content': ...} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise InvalidParameterError(f"messages[{i}] must be an object with 'role' and 'content'")
        clash = _GLOBAL_NAMES.intersection(extra)
        if clash:
            raise InvalidParameterError(f"template variable {sorted(clash)[0]!r} is reserved")
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        budget = _Budget(self.limits)
        previous = getattr(_active, "budget", None)
        _active.budget = budget
        try:
            parts: list[str] = []
            size = 0
            for piece in self._template.generate(variables):
                size += len(piece)
                if size > self.limits.max_output_chars:
                    raise TemplateError(
                        f"chat template output exceeds {self.limits.max_output_chars} characters"
                    )
                parts.append(piece)
            return "".join(parts)
        except TemplateError:
            raise
        except SecurityError as e:
            raise TemplateError(_one_line(f"chat template tried to escape its sandbox: {e}")) from None
        except jinja2.TemplateError as e:
            raise TemplateError(_one_line(f"chat template failed: {e}")) from None
        except RecursionError:
            raise TemplateError("chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateError("chat template ran out of memory") from None
        except Exception as e:  # noqa: BLE001 - any error inside a template is the template's failure
            raise TemplateError(_one_line(f"chat template failed: {type(e).__name__}: {e}")) from None
        finally:
            _active.budget = previous

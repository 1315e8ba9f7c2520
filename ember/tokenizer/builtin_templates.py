"""Built-in chat templates: the Jinja text of llama.cpp's hard-coded chat formats, and which one a GGUF file
without its own `tokenizer.chat_template` gets for its architecture.

Kept apart from the renderer (chat_template.py) and its sandbox (template_sandbox.py) because this is data, checked
byte for byte against llama.cpp's outputs, and changes for different reasons than the code that renders it.
"""
from __future__ import annotations

from typing import Mapping

from ember.errors import TemplateError

__all__ = ["ARCHITECTURE_TEMPLATES", "BUILTIN_TEMPLATES", "builtin_template"]

# -----------------------------------------------------------------------------------------------------------
# Built-in templates. Each reproduces llama.cpp's hard-coded format of the same name (src/llama-chat.cpp,
# llm_chat_apply_template), including its quirks: contents trimmed with C isspace() where llama.cpp trims,
# no BOS text (the tokenizer adds BOS), and llama2/mistral ignoring add_generation_prompt.
#
# | name              | renders [system s, user u, assistant a] as (T = trimmed)            | generation prompt       |
# |-------------------|---------------------------------------------------------------------|-------------------------|
# | chatml            | <|im_start|>{role}\n{content}<|im_end|>\n per message               | <|im_start|>assistant\n |
# | gemma3 (gemma)    | <start_of_turn>user\n{T s}\n\n{T u}<end_of_turn>\n                  | <start_of_turn>model\n  |
# |                   | <start_of_turn>model\n{T a}<end_of_turn>\n                          |                         |
# | llama3            | <|start_header_id|>{role}<|end_header_id|>\n\n{T content}<|eot_id|> | the same, assistant     |
# | llama2            | [INST] s\nu [/INST]a</s>                                            | none                    |
# | llama2-sys        | [INST] <<SYS>>\ns\n<</SYS>>\n\nu [/INST]a</s>                       | none                    |
# | mistral-v1        | " [INST] s\n\nu [/INST] a</s>"                                      | none                    |
# | mistral-v3        | "[INST] s\n\nu[/INST] {T a}</s>"                                    | none                    |
# | mistral-v3-tekken | "[INST]s\n\nu[/INST]a</s>"                                          | none                    |
# | mistral-v7        | "[SYSTEM_PROMPT] s[/SYSTEM_PROMPT][INST] u[/INST] a</s>"            | none                    |
# | mistral-v7-tekken | "[SYSTEM_PROMPT]s[/SYSTEM_PROMPT][INST]u[/INST]a</s>"               | none                    |
#
# Gemma has no system role: llama.cpp merges system text into the next user turn. The llama2 and mistral formats
# open a new [INST] after every assistant turn.
# `ws` is C's isspace() set: Python's str.strip() would also strip Unicode spaces, which llama.cpp keeps.
# A message whose content is missing or not a string (e.g. an assistant turn with only tool_calls) renders as "".
# -----------------------------------------------------------------------------------------------------------
_PRELUDE = r"{%- set ws = ' \t\n\v\f\r' -%}"
_CONTENT = r"{%- set content = message['content'] if message['content'] is string else '' -%}"

_CHATML = r"""
{%- for message in messages -%}
    {%- CONTENT -%}
    {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ content ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_GEMMA = r"""
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- CONTENT -%}
    {%- if message['role'] == 'system' -%}
        {#- Gemma has no system role: llama.cpp prepends it to the next non-model turn. -#}
        {%- set ns.system = ns.system ~ (content | trim(ws)) -%}
    {%- else -%}
        {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
        {{- '<start_of_turn>' ~ role ~ '\n' -}}
        {%- if ns.system and role != 'model' -%}
            {{- ns.system ~ '\n\n' -}}
            {%- set ns.system = '' -%}
        {%- endif -%}
        {{- (content | trim(ws)) ~ '<end_of_turn>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

_LLAMA3 = r"""
{%- for message in messages -%}
    {%- CONTENT -%}
    {{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' ~ (content | trim(ws)) ~ '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""


def _llama2(system_open: str, system_close: str) -> str:
    # llama.cpp opens the first [INST] unconditionally and re-opens one after each assistant turn.
    return r"""
{%- set ns = namespace(inside=true) -%}
{{- '[INST] ' -}}
{%- for message in messages -%}
    {%- CONTENT -%}
    {%- if not ns.inside -%}
        {{- '[INST] ' -}}
        {%- set ns.inside = true -%}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- 'OPEN' ~ content ~ 'CLOSE' -}}
    {%- elif message['role'] == 'user' -%}
        {{- content ~ ' [/INST]' -}}
    {%- else -%}
        {{- content ~ '</s>' -}}
        {%- set ns.inside = false -%}
    {%- endif -%}
{%- endfor -%}
""".replace("OPEN", system_open).replace("CLOSE", system_close)


def _mistral(lead: str, trail: str, trim_assistant: bool) -> str:
    # v1/v3/v3-tekken differ only in the spaces around [INST] and whether assistant text is trimmed.
    assistant = "(content | trim(ws))" if trim_assistant else "content"
    return r"""
{%- set ns = namespace(inside=false) -%}
{%- for message in messages -%}
    {%- CONTENT -%}
    {%- if not ns.inside -%}
        {{- 'LEAD[INST]TRAIL' -}}
        {%- set ns.inside = true -%}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- content ~ '\n\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- content ~ 'LEAD[/INST]' -}}
    {%- else -%}
        {{- 'TRAIL' ~ ASSISTANT ~ '</s>' -}}
        {%- set ns.inside = false -%}
    {%- endif -%}
{%- endfor -%}
""".replace("LEAD", lead).replace("TRAIL", trail).replace("ASSISTANT", assistant)


def _mistral_v7(space: str) -> str:
    return r"""
{%- for message in messages -%}
    {%- CONTENT -%}
    {%- if message['role'] == 'system' -%}
        {{- '[SYSTEM_PROMPT]@SP@' ~ content ~ '[/SYSTEM_PROMPT]' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '[INST]@SP@' ~ content ~ '[/INST]' -}}
    {%- else -%}
        {{- '@SP@' ~ content ~ '</s>' -}}
    {%- endif -%}
{%- endfor -%}
""".replace("@SP@", space)


def _finish(body: str) -> str:
    return _PRELUDE + body.replace("{%- CONTENT -%}", _CONTENT).strip()


BUILTIN_TEMPLATES: Mapping[str, str] = {
    "chatml": _finish(_CHATML),
    "gemma3": _finish(_GEMMA),
    "llama3": _finish(_LLAMA3),
    "llama2": _finish(_llama2("", r"\n")),
    "llama2-sys": _finish(_llama2(r"<<SYS>>\n", r"\n<</SYS>>\n\n")),
    "mistral-v1": _finish(_mistral(" ", " ", trim_assistant=False)),
    "mistral-v3": _finish(_mistral("", " ", trim_assistant=True)),
    "mistral-v3-tekken": _finish(_mistral("", "", trim_assistant=False)),
    "mistral-v7": _finish(_mistral_v7(" ")),
    "mistral-v7-tekken": _finish(_mistral_v7("")),
}
_ALIASES: Mapping[str, str] = {"gemma": "gemma3", "mistral": "mistral-v3"}

# GGUF general.architecture -> built-in template for files that carry none. Anything else gets ChatML, as in
# llama.cpp: "llama" alone cannot tell Llama 2, Llama 3, Mistral or SmolLM apart.
ARCHITECTURE_TEMPLATES: Mapping[str, str] = {
    "gemma": "gemma3",
    "gemma2": "gemma3",
    "gemma3": "gemma3",
    "gemma3n": "gemma3",
}


def builtin_template(name: str) -> str:
    """Jinja source of a built-in template (see the table above); raises TemplateError for unknown names."""
    key = _ALIASES.get(name, name)
    try:
        return BUILTIN_TEMPLATES[key]
    except KeyError:
        known = ", ".join(sorted([*BUILTIN_TEMPLATES, *_ALIASES]))
        raise TemplateError(f"unknown built-in chat template {name!r} (known: {known})") from None

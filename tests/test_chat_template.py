"""Chat templates: built-ins against llama.cpp's own outputs, GGUF templates against llama-cpp-python's Jinja
rendering, transformers' globals and filters, and the sandbox's containment of hostile templates."""
from __future__ import annotations

import json
import time
from datetime import datetime

import pytest

from ember.errors import InvalidParameterError, TemplateError
from ember.tokenizer.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    RenderLimits,
    builtin_template,
    select_template,
)

SMOL = "SmolLM2-135M-Instruct.Q4_1"
GEMMA = "gemma-3-270m-q4_k_m"
FIXTURE_MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]


def conv(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


# The conversation of llama.cpp's tests/test-chat-template.cpp (main_automated_tests); note the padded
# assistant answer, which shows which formats trim.
LLAMACPP_CONVERSATION = conv(
    ("system", "You are a helpful assistant"),
    ("user", "Hello"),
    ("assistant", "Hi there"),
    ("user", "Who are you"),
    ("assistant", "   I am an assistant   "),
    ("user", "Another question"),
)

# `expected_output` of that file: llama.cpp's built-in (non-Jinja) formatter, which our built-ins reproduce.
# llama2-sys is llama.cpp's LLAMA_2_SYS, derived from its code (that file only tests the -bos/-strip variants).
LLAMACPP_EXPECTED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
              "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
              "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question"
              "<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\n"
              "Hi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\n"
              "I am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n"
              "<start_of_turn>model\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you"
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>"
              "assistant<|end_header_id|>\n\n",
    "llama2": "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   "
              "I am an assistant   </s>[INST] Another question [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] "
                  "Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    "mistral-v1": " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]"
                  "    I am an assistant   </s> [INST] Another question [/INST]",
    "mistral-v3": "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] "
                  "I am an assistant</s>[INST] Another question[/INST]",
    "mistral-v3-tekken": "[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are you[/INST]"
                         "   I am an assistant   </s>[INST]Another question[/INST]",
    "mistral-v7": "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>"
                  "[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another question[/INST]",
}

# A tools-aware template in the style of Qwen2.5 / Hermes function calling (written for this test).
HERMES = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\n\n# Tools\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\nAnswer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- for call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- call.function.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# -- references ---------------------------------------------------------------------------------------------
def test_gemma3_builtin_matches_llama_cpp(llamacpp_ref):
    expected = llamacpp_ref["models"][GEMMA]["chat_formatted_c_api_builtin_gemma"]
    assert expected == "<start_of_turn>user\nYou are helpful.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
    assert ChatTemplate(builtin_template("gemma3")).render(FIXTURE_MESSAGES) == expected


def test_smollm2_gguf_template_matches_llama_cpp_python(llamacpp_ref):
    ref = llamacpp_ref["models"][SMOL]
    template = ChatTemplate(ref["chat_template"])
    assert template.render(FIXTURE_MESSAGES) == ref["chat_formatted_jinja2_llama_cpp_python_add_generation_prompt"]
    assert template.render(FIXTURE_MESSAGES) == ref["chat_formatted_c_api_llama_chat_apply_template_add_ass"]
    assert not template.supports_tools


@pytest.mark.parametrize("name", sorted(LLAMACPP_EXPECTED))
def test_builtins_match_llama_cpp_multi_turn(name):
    assert ChatTemplate(builtin_template(name)).render(LLAMACPP_CONVERSATION) == LLAMACPP_EXPECTED[name]


def test_every_builtin_is_covered_and_aliases_resolve():
    assert set(BUILTIN_TEMPLATES) - set(LLAMACPP_EXPECTED) == {"mistral-v7-tekken"}
    assert builtin_template("gemma") == builtin_template("gemma3")
    assert builtin_template("mistral") == builtin_template("mistral-v3")
    tekken = ChatTemplate(builtin_template("mistral-v7-tekken")).render(LLAMACPP_CONVERSATION[:3])
    assert tekken == "[SYSTEM_PROMPT]You are a helpful assistant[/SYSTEM_PROMPT][INST]Hello[/INST]Hi there</s>"
    with pytest.raises(TemplateError, match="unknown built-in"):
        builtin_template("vicuna")


def test_default_system_prompt_and_no_system(llamacpp_ref):
    smol = ChatTemplate(llamacpp_ref["models"][SMOL]["chat_template"])
    assert smol.render(conv(("user", "Hi!"))) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    gemma = ChatTemplate(builtin_template("gemma3"))
    assert gemma.render(conv(("user", "Hi!"))) == "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"


def test_add_generation_prompt_false():
    msgs = conv(("user", "Hi!"), ("assistant", "Hello."))
    assert ChatTemplate(builtin_template("chatml")).render(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")
    assert ChatTemplate(builtin_template("gemma3")).render(msgs, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")


def test_gemma_trims_only_c_whitespace():
    # llama.cpp trims with isspace(); a no-break space is content.
    out = ChatTemplate(builtin_template("gemma3")).render(conv(("user", "\u00a0Hi \t\n")))
    assert out == "<start_of_turn>user\n\u00a0Hi<end_of_turn>\n<start_of_turn>model\n"


def test_tools_reach_a_tools_aware_template():
    template = ChatTemplate(HERMES)
    assert template.supports_tools
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18°C, sunny"},
    ]
    # tojson as transformers: json.dumps defaults (", " and ": "), Unicode kept unescaped.
    assert template.render(messages, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Météo actuelle", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        '</tools>\nAnswer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # Without tools the same template takes its plain branch.
    assert template.render(conv(("user", "Hi"))) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# -- transformers' rendering environment ---------------------------------------------------------------------
def test_tojson_options_as_transformers():
    data = {"b": 1, "a": [1, 2], "h": "<a href='x'>&é"}
    assert ChatTemplate("{{ d | tojson }}").render([], d=data) == json.dumps(data, ensure_ascii=False)
    assert ChatTemplate("{{ d | tojson }}").render([], d={"h": "<&'é"}) == '{"h": "<&\'é"}'  # no HTML escaping
    assert ChatTemplate("{{ d | tojson(indent=2, sort_keys=true) }}").render([], d={"b": 1, "a": [1]}) == (
        '{\n  "a": [\n    1\n  ],\n  "b": 1\n}')
    assert ChatTemplate("{{ d | tojson(separators=(',', ':')) }}").render([], d={"a": [1, 2]}) == '{"a":[1,2]}'
    assert ChatTemplate("{{ d | tojson(ensure_ascii=true) }}").render([], d="é") == '"\\u00e9"'


def test_trim_blocks_lstrip_blocks_and_loopcontrols():
    source = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
              "[{{ m.content }}]\n{% endfor %}\n")
    out = ChatTemplate(source).render(conv(("user", "a"), ("user", "b"), ("user", "c")))
    assert out == "[a]\n[b]\n"


def test_raise_exception_carries_the_templates_message():
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate!') }}{% endif %}"
    with pytest.raises(TemplateError, match="Conversation roles must alternate!"):
        ChatTemplate(source).render(conv(("assistant", "x")))
    assert ChatTemplate(source).render(conv(("user", "x"))) == ""


def test_strftime_now():
    before = datetime.now().strftime("%d %b %Y")
    out = ChatTemplate("{{ strftime_now('%d %b %Y') }}").render([])
    assert out in {before, datetime.now().strftime("%d %b %Y")}


def test_variables_extras_and_bos_eos():
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ tools }}", "<s>", "</s>")
    assert t.render([], enable_thinking=False) == "<s>|</s>|False|None"
    assert t.render([], bos_token="[B]") == "[B]|</s>||None"  # extras override, as in transformers
    with pytest.raises(InvalidParameterError, match="range"):
        t.render([], range=[1])
    with pytest.raises(InvalidParameterError):
        t.render("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        t.render(["hello"])  # type: ignore[list-item]


def test_generation_tag_renders_its_body():
    source = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert ChatTemplate(source).render(conv(("assistant", "x"))) == "<x>"


def test_errors_are_one_line_template_errors():
    with pytest.raises(TemplateError) as err:
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n")
    assert "line" in str(err.value) and "\n" not in str(err.value)
    for source in ["{{ foo.bar }}", "{{ 1 / 0 }}", "{{ messages | tojson }}{{ x | int(base=99) }}",
                   "{% include 'other' %}"]:
        with pytest.raises(TemplateError) as err:
            ChatTemplate(source).render(conv(("user", "x")))
        assert "\n" not in str(err.value)


# -- containment --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ namespace.__init__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ messages[0]['__class__'] }}",
    "{{ messages | attr('__class__') }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update(role='system') }}",
    "{{ 'abc'.translate({97: 'x'}) }}",
])
def test_sandbox_escapes_are_template_errors(source):
    messages = conv(("user", "x"))
    with pytest.raises(TemplateError):
        ChatTemplate(source).render(messages)
    assert messages == conv(("user", "x"))


HUGE = [
    "{{ 'a' * 10**9 }}",
    "{{ 9**999999 }}",
    "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ 'a' | center(10**9) }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{{ range(100000) | join('x' * 1000000) }}",
    "{{ ('a' * 100000).replace('', 'x' * 100000) }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{0:{1}}'.format('a', 999999999) }}",
    "{% set b = 'a' * 1000000 %}{{ ('{0}' * 100).format(b) }}",
    "{% set b = 'a' * 1000000 %}{{ [b] * 1000 }}",
    "{% set b = 'a' * 1000000 %}{{ ([b] * 1000) | tojson }}",
    "{% set n = namespace(a='a' * 1000000) %}{% set x = ([n] * 1000) | string %}",
    "{% set b = 'a' * 1000000 %}{% set x %}{% for i in range(100000) %}{{ b }}{% endfor %}{% endset %}",
    "{% set b = 'a' * 1000000 %}{% macro m() %}{% for i in range(99999) %}{{ b }}{% endfor %}{% endmacro %}"
    "{% set y = m() %}",
    "{% set x %}{% for i in range(100000) %}" + "A" * 1000 + "{% endfor %}{% endset %}",
    "{{ range(1) | batch(10**9, 'x') | list }}",
    "{{ ('\n' * 100000) | indent(100000) }}",
    "{% set b = [0] * 1000000 %}{{ ([b] * 1000) | sum(start=[]) }}",
    "{% set b = [0] * 1000000 %}{{ ([{'x': b}] * 1000) | sum(attribute='x', start=[]) }}",
    "{% set b = 'a' * 1000000 %}{{ ([b] * 1000) | indent(2) }}",
    "{{ {}.fromkeys(range(100000), 'a' * 1000000) | tojson }}",
    "{{ range(10**12) | length }}",
]


@pytest.mark.parametrize("source", HUGE)
def test_enormous_values_are_refused_before_they_are_built(source):
    t0 = time.perf_counter()
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([])
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{% set _ = f(n - 1) %}{% set _ = f(n - 1) %}{% endif %}{% endmacro %}"
    "{% set _ = f(60) %}",
    "{% set n = namespace() %}{% set n.x = [n, n] %}{% for i in [n] recursive %}{{ loop(i.x) }}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
])
def test_endless_work_is_stopped(source):
    with pytest.raises(TemplateError):
        ChatTemplate(source, limits=RenderLimits(max_steps=50_000)).render([])


def test_step_and_time_limits():
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="steps"):
        ChatTemplate(nested).render([])  # default limits
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than"):
        ChatTemplate(nested, limits=RenderLimits(max_steps=10**12, timeout_s=0.2)).render([])
    assert time.perf_counter() - t0 < 3.0


def test_output_limit_is_exact():
    limits = RenderLimits(max_output_chars=1000)
    assert len(ChatTemplate("{{ 'a' * 1000 }}", limits=limits).render([])) == 1000
    with pytest.raises(TemplateError, match="output exceeds 1000"):
        ChatTemplate("{{ 'a' * 1000 }}b", limits=limits).render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{% for i in range(2000) %}a{% endfor %}", limits=limits).render([])
    with pytest.raises(InvalidParameterError):
        RenderLimits(max_output_chars=0)


def test_long_real_conversation_is_not_refused(llamacpp_ref):
    # 2,000 turns, ~0.5 MB: far beyond real chats, far within the bounds.
    template = ChatTemplate(llamacpp_ref["models"][SMOL]["chat_template"])
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "word " * 40} for i in range(2000)]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n")
    assert template.render(messages) == default_system + expected + "<|im_start|>assistant\n"


def test_oversized_source_is_refused():
    with pytest.raises(TemplateError, match="limit"):
        ChatTemplate("a" * (2 << 20))


# -- selection from GGUF metadata -----------------------------------------------------------------------------
def test_select_uses_the_files_template_and_token_texts():
    metadata = {
        "tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "hi"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    t = select_template(metadata, "llama")
    assert (t.bos_token, t.eos_token) == ("<s>", "</s>")
    assert t.render(conv(("user", "x"))) == "<s>x</s>"


def test_select_falls_back_by_architecture(llamacpp_ref):
    gemma = select_template({}, "gemma3")
    assert gemma.render(FIXTURE_MESSAGES) == llamacpp_ref["models"][GEMMA]["chat_formatted_c_api_builtin_gemma"]
    # Unknown architectures get ChatML, as llama.cpp (its fallback render of the same messages).
    other = select_template({"tokenizer.chat_template": "  "}, "mamba")
    chatml_fallback = llamacpp_ref["models"][GEMMA]["chat_formatted_c_api_llama_chat_apply_template_add_ass"]
    assert other.render(FIXTURE_MESSAGES) == chatml_fallback
    assert (other.bos_token, other.eos_token) == ("", "")


@pytest.mark.model
def test_select_from_real_gguf_files(llamacpp_ref, smollm2_path, gemma3_path):
    from ember.gguf import open_gguf

    for path, key, fixture in [(smollm2_path, SMOL, "chat_formatted_jinja2_llama_cpp_python_add_generation_prompt"),
                               (gemma3_path, GEMMA, "chat_formatted_c_api_builtin_gemma")]:
        ref = llamacpp_ref["models"][key]
        with open_gguf(path) as f:
            template = select_template(f.metadata, f.architecture)
            tokens = f.metadata["tokenizer.ggml.tokens"]
        assert template.render(FIXTURE_MESSAGES) == ref[fixture]
        assert (template.bos_token, template.eos_token) == (tokens[ref["bos_id"]], tokens[ref["eos_id"]])

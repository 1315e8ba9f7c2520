"""Shared pieces of the server tests: a tools-aware template for SmolLM2 and one tool.

SmolLM2's own template has no tools, so the tool-calling tests serve it under an alias with this few-shot
Hermes-style template (written for these tests), under which it reliably emits <tool_call> JSON.
"""
from __future__ import annotations

HERMES_TOOLS = r"""{%- if tools %}<|im_start|>system
You are a function calling AI model. Here are the available tools: <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
For each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-dict>}
</tool_call><|im_end|>
<|im_start|>user
What is the weather in London?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "London"}}
</tool_call><|im_end|>
<|im_start|>user
What is the weather in Berlin?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Berlin"}}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

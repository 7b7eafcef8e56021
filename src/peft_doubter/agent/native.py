"""Native tool calls through the model's own chat template.

`NativeToolPrompt` renders a conversation with `tokenizer.apply_chat_template(messages, tools=...)` (thinking off,
under both names templates use) and, for a template that ignores `tools` (SmolLM2-135M-Instruct's plain ChatML),
a bundled Hermes-style template in the Qwen 2.5 layout: tools listed in the system turn, calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `<tool_response>` user turns.
`NativeToolRenderer` parses a generated assistant turn with transformers' response parsing (`parse_response`)
against the matching response template, falls back to a lenient search for a JSON call, and never drops text it
cannot parse: it stays in `content`, with the reason in `parse_error`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import StoppingCriteria


HERMES_TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- continue %}{%- endif %}
{%- if message['role'] == 'tool' %}<|im_start|>user
<tool_response>
{{ message['content'] }}
</tool_response><|im_end|>
{% elif message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant
{% if message.get('content') %}{{ message['content'] }}
{% endif %}{%- for call in message['tool_calls'] %}<tool_call>
{"name": "{{ call['function']['name'] }}", "arguments": {{ call['function']['arguments'] | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# transformers' response-template spec for the layout above (the same fields as its Qwen 2 fallback).
HERMES_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}
TOOL_CALL_STOP = "</tool_call>"  # generation of a call ends here (kept in the text)
TURN_STOPS = ("<|im_end|>", "\n<|im_start|>")  # the model must not write the next turn itself
_JSON_CALL = re.compile(r"\{.*\}", re.DOTALL)


class TextStop(StoppingCriteria):
    """Stop a row once its generated text contains one of `stops` (decoded text, so it works with every tokenizer;
    `generate(stop_strings=...)` needs a byte-level tokenizer's token strings)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=False)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str], keep: Sequence[str] = ()) -> str:
    """`text` up to its first stop string (included when it is in `keep`, e.g. the end of a tool call)."""
    hits = [(text.index(stop), stop) for stop in stops if stop in text]
    if not hits:
        return text
    position, stop = min(hits)
    return text[: position + (len(stop) if stop in keep else 0)]


@dataclass
class Turn:
    """A parsed assistant turn: its text, its tool calls (`{"name", "arguments": dict}`) and why parsing failed."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    parse_error: Optional[str] = None


class NativeToolPrompt:
    """Chat prompts with tools through the tokenizer's own template, or the bundled Hermes template for a template
    that ignores `tools`."""

    def __init__(self, tokenizer) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("Native tool calls need a chat model (the tokenizer has no chat template); base "
                             "models look things up through the controller.")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "ping"}]
        tool = {"type": "function", "function": {"name": "probe_tool", "description": "d", "parameters": {
            "type": "object", "properties": {}}}}
        self.ignores_tools = self._render(probe, [tool], None) == self._render(probe, None, None)
        self.template = HERMES_TOOL_TEMPLATE if self.ignores_tools else None

    def _render(self, messages: list[dict[str, Any]], tools: Optional[list[dict]], template: Optional[str]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                                  add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=False, thinking=False)

    def render(self, messages: list[dict[str, Any]], tools: Optional[list[dict]] = None) -> str:
        return self._render(messages, tools, self.template if tools else None)


class NativeToolRenderer:
    """Parses generated assistant turns into content and tool calls."""

    def __init__(self, tokenizer, template: Optional[dict] = None) -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "response_template", None) or HERMES_RESPONSE_TEMPLATE

    def parse(self, text: str, prefix: Optional[str] = None) -> Turn:
        try:
            message = self.tokenizer.parse_response(text, schema=self.template, prefix=prefix or "")
            calls = [_call(c) for c in message.get("tool_calls") or []]
            return Turn((message.get("content") or "").strip(), calls)
        except Exception as error:  # fall back to a lenient search; the text is kept either way
            reason = f"{type(error).__name__}: {error}"
        match = _JSON_CALL.search(text)
        if match:
            try:
                call = _call(json.loads(match.group(0)))
                return Turn((text[: match.start()] + text[match.end():]).replace("<tool_call>", "").replace(
                    TOOL_CALL_STOP, "").strip(), [call], f"parsed leniently ({reason})")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                reason = f"{reason}; no JSON call ({error})"
        return Turn(text.strip(), [], reason)


def _call(value: dict[str, Any]) -> dict[str, Any]:
    """`{"name", "arguments"}` from a parsed call (`{"type": "function", "function": {...}}` or the bare call)."""
    function = value.get("function", value)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if "name" not in function or not isinstance(arguments, dict):
        raise KeyError("a tool call needs a name and an arguments object")
    return {"name": str(function["name"]), "arguments": arguments}

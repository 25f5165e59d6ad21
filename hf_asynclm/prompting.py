"""How tools and the CML protocol reach the model's prompt.

Two routes:

* A CML checkpoint ships a chat template that knows CML (it mentions ``[CALL]``): the tools go
  through ``tokenizer.apply_chat_template(messages, tools=...)`` and the template renders them.
  :data:`CML_CHAT_TEMPLATE` is the template our checkpoints ship.
* Any other model gets :func:`cml_system_prompt` as a system message: the protocol, the tools and
  worked examples, for few-shot use of models that were never tuned for CML.

Tool schemas are the ``{"type": "function", "function": {...}}`` dicts that
``transformers.utils.get_json_schema`` returns; an optional ``"x-latency-ms"`` key in the
function dict tells the model the call's expected execution time (the LPT rule starts the
longest call first).

Example:

```python
>>> from hf_asynclm.prompting import describe_tool
>>> describe_tool({"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
...     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
...     "x-latency-ms": 300}})
'get_weather(city) ~300ms: Weather now.'

```
"""

from __future__ import annotations

from typing import Any, Sequence

from .cml import CALL, END, HEAD, INTR, TRAP, format_call, format_interrupt, format_trap

#: Chat template of CML checkpoints: compact tool lines, then the conversation.
CML_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>{{ '\\n' }}"
    "{% for t in tools %}{% set f = t.function if t.function is defined else t %}"
    "{{ f.name }}({{ (f.parameters.properties if f.parameters is defined and f.parameters.properties is defined else {}) | join(', ') }})"
    "{% if f['x-latency-ms'] is defined %} ~{{ f['x-latency-ms'] }}ms{% endif %}{{ '\\n' }}"
    "{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ '\\n' }}{{ m.content }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)
# marker so that code can tell a CML-aware template: the template is tagged with the marker text
CML_CHAT_TEMPLATE = "{#- CML: " + CALL + " -#}" + CML_CHAT_TEMPLATE

#: Token budget of a CML answer (tokens the model writes; injected results do not count): what
#: checkpoints made by ``hf-asynclm train`` set in ``generation_config.json`` (so that
#: ``generate`` without ``max_new_tokens`` does not stop at transformers' 20 tokens), the CLI's
#: ``--max-new-tokens`` and ``hf-asynclm eval``'s. An answer that quotes its results runs long:
#: the simulator's reference traces of requests with four or five calls write up to ~470 tokens
#: (half of the mixed ones more than 256), BFCL cheat-sheet traces up to ~465; a smaller budget
#: cuts a right answer off.
CML_MAX_NEW_TOKENS = 768


def template_knows_cml(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template renders tools for CML (mentions ``[CALL]``)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and CALL in template


def _function(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["function"] if "function" in schema else schema


def describe_tool(schema: dict[str, Any]) -> str:
    """One line per tool: ``name(p1, p2) ~Nms: description``."""
    f = _function(schema)
    params = ", ".join((f.get("parameters") or {}).get("properties", {}) or {})
    line = f"{f['name']}({params})"
    latency = f.get("x-latency-ms", schema.get("x-latency-ms"))
    if latency is not None:
        line += f" ~{latency}ms"
    desc = (f.get("description") or "").strip().splitlines()
    if desc:
        line += f": {desc[0]}"
    return line


def cml_system_prompt(tools: Sequence[dict[str, Any]], examples: bool = True) -> str:
    """The default system prompt for models not tuned for CML: protocol, tools, examples."""
    lines = [
        "You can call tools asynchronously while you keep writing.",
        f"To start a call, write {format_call('name(arg=value)', call_id='id')} on its own; "
        "the id names the result. Arguments are Python literals.",
        f"Do not wait for the result: keep writing. Results arrive as {format_interrupt('id', 'value')}; "
        f"never write {INTR} yourself.",
        f"If you have nothing left to do until a result arrives, write {format_trap()}.",
        "An argument may name an earlier call id to pass its result.",
        "",
        "Tools:",
    ]
    lines += [f"- {describe_tool(t)}" for t in tools]
    if examples:
        lines += [
            "",
            "Example:",
            "User: Weather in Paris and in Rome?",
            "Assistant: "
            + format_call('get_weather(city="Paris")', call_id="w1")
            + " "
            + format_call('get_weather(city="Rome")', call_id="w2")
            + " "
            + format_trap()
            + format_interrupt("w1", '{"temp_c": 18}')
            + " Paris: 18 C. "
            + format_trap()
            + format_interrupt("w2", '{"temp_c": 21}')
            + " Rome: 21 C.",
        ]
    return "\n".join(lines)


def build_prompt(
    tokenizer: Any,
    prompt_or_messages: str | Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] = (),
    system_prompt: bool | str = True,
) -> str:
    """Render a prompt (text) for ``prompt_or_messages`` with ``tools``.

    A plain string without a chat template is used as it is (with the CML system prompt in
    front when there are tools). Messages go through the chat template; when the template
    knows CML the tools are passed with ``tools=``, otherwise the default CML system prompt is
    added as a system message (``system_prompt=False`` disables it, a string replaces it).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt_or_messages, str):
        if not has_template:
            if tools and system_prompt:
                sys_text = system_prompt if isinstance(system_prompt, str) else cml_system_prompt(tools)
                return f"{sys_text}\n\n{prompt_or_messages}"
            return prompt_or_messages
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = [dict(m) for m in prompt_or_messages]
        if not has_template:
            raise ValueError(
                "messages were given but the tokenizer has no chat template: pass a plain string prompt, "
                "or set tokenizer.chat_template"
            )
    if template_knows_cml(tokenizer):
        return tokenizer.apply_chat_template(
            messages, tools=list(tools) or None, add_generation_prompt=True, tokenize=False
        )
    if tools and system_prompt and not any(m.get("role") == "system" for m in messages):
        sys_text = system_prompt if isinstance(system_prompt, str) else cml_system_prompt(tools)
        messages.insert(0, {"role": "system", "content": sys_text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


__all__ = [
    "CML_CHAT_TEMPLATE",
    "CML_MAX_NEW_TOKENS",
    "build_prompt",
    "cml_system_prompt",
    "describe_tool",
    "template_knows_cml",
    "HEAD",
    "END",
]

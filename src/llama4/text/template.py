"""The Jinja chat template that renders our chat format (`text/chat.py`) for `apply_chat_template`.

Saves carry it (`chat_template.jinja` and `tokenizer_config.json`), so transformers, vLLM and
llama.cpp build the same prompts that `Tokenizer.encode_chat` builds:

- `<|begin_of_text|>`, then per message `<|header_start|>{role}<|header_end|>\\n\\n{content}` closed by
  `<|eot|>`, or by `<|eom|>` for tool results and for assistant turns that call a tool;
- the `tool` role is written `ipython`; an assistant turn without content is empty;
- tool calls are written as Meta's ToolUtils writes them: JSON `{"type": "function", "name": ...,
  "parameters": {...}}`, `brave_search` / `wolfram_alpha` / `photogen` as `name.call(query="...")`,
  `code_interpreter` as its bare code. Arguments may be a dict (HF's convention) or, as OpenAI sends
  them, a JSON string, which is written as given (`encode_chat` re-serialises it with `json.dumps`:
  pass a dict, or a string in that canonical form, for the two to agree);
- every image part (`image` or `image_url`) becomes one `<|image|>`, which the processor
  (transformers' `Llama4Processor`) expands into the tile layout once it knows the image's tile grid.
  Video parts need frame timestamps that only llama4's `encode_prompt` samples: the template refuses them.

Two limits come from rendering to a string that is then tokenized whole, not from the template:
special-token strings inside message text (`"<|eot|>"` typed by a user) become special tokens there,
while `encode_chat` keeps them plain text; and two text pieces that `encode_chat` encodes separately
(text then a tool call, two tool calls) can merge across the seam when a BPE pre-token spans it.
"""

from __future__ import annotations

import json

BUILTIN_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")

CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- if role not in ['system', 'user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception('unknown role ' ~ role ~ '; expected system, user, assistant or tool') }}
    {%- endif %}
    {{- '<|header_start|>' ~ ('ipython' if role in ['tool', 'ipython'] else role) ~ '<|header_end|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- elif message['content'] is defined and message['content'] is not none %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] }}
            {%- elif part['type'] in ['image', 'image_url'] %}
                {{- '<|image|>' }}
            {%- elif part['type'] in ['video', 'video_url'] %}
                {{- raise_exception('video parts need frame timestamps: render them with llama4 encode_prompt') }}
            {%- else %}
                {{- raise_exception('unknown content part type ' ~ part['type']) }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] %}
    {%- for call in calls %}
        {%- set fn = call['function'] %}
        {%- set args = fn['arguments'] if fn['arguments'] is defined and fn['arguments'] is not none else {} %}
        {%- if fn['name'] in ['brave_search', 'wolfram_alpha', 'photogen', 'code_interpreter'] and args is string %}
            {{- raise_exception('built-in tool ' ~ fn['name'] ~ ': pass its arguments as a dict') }}
        {%- elif fn['name'] in ['brave_search', 'wolfram_alpha', 'photogen'] %}
            {{- fn['name'] ~ '.call(query="' ~ args['query'] ~ '")' }}
        {%- elif fn['name'] == 'code_interpreter' %}
            {{- args['code'] }}
        {%- elif args is string %}
            {{- '{"type": "function", "name": ' ~ (fn['name'] | tojson(ensure_ascii=true)) ~ ', "parameters": ' ~ (args if args | trim else '{}') ~ '}' }}
        {%- else %}
            {{- {'type': 'function', 'name': fn['name'], 'parameters': args} | tojson(ensure_ascii=true) }}
        {%- endif %}
    {%- endfor %}
    {{- '<|eom|>' if role in ['tool', 'ipython'] or calls else '<|eot|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>\n\n' }}
{%- endif %}"""


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str = "<|begin_of_text|>") -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, trim/lstrip blocks, its
    `tojson`), without transformers. Used to read a checkpoint's template back and check it."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token)

"""Tools for Llama 4 chat: the system prompt that lists them, and a parser for the calls the model writes.

Published Llama 4 checkpoints write calls in two forms, and a server must read both:

- pythonic, as Meta's Llama 4 tool prompt asks: `[get_weather(city="Paris"), get_time(tz="CET")]`;
- JSON, as the Llama 3 format (and this package's own chat renderer) writes them:
  `{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}`, possibly several,
  separated by `;` or newlines, possibly inside `<|python_start|> ... <|python_end|>`.

Either may follow some text ("Let me check. [get_weather(...)]"); vLLM's `llama4_pythonic` parser
misses those. Pythonic arguments are read with `ast.literal_eval`, never evaluated.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass

_TOOL_PROMPT = """You are a helpful assistant and an expert in function composition. You can answer general \
questions using your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If a function is not in the list, respond ONLY with internal knowledge
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: output \
ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]

2. RESPONSE RULES:
- Don't add explanations when calling a function
- If you decide to invoke any of the function(s), you MUST put it in the format \
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]

Here is a list of functions in JSON format that you can invoke.

"""


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def openai(self, index: int | None = None) -> dict:
        out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}
        if index is not None:
            out["index"] = index
        return out


def tool_system_prompt(tools: list[dict], choice: object = "auto") -> str:
    """The system text listing `tools` (OpenAI `tools` entries) in Meta's Llama 4 pythonic style."""
    fns = [t["function"] for t in tools]
    text = _TOOL_PROMPT + json.dumps(fns, indent=2)
    if choice == "required":
        text += "\n\nYou MUST call at least one of these functions."
    elif isinstance(choice, dict):
        text += f"\n\nYou MUST call the function {choice['function']['name']!r}."
    return text


def with_tools(messages: list[dict], tools: list[dict], choice: object = "auto") -> list[dict]:
    """`messages` with the tool prompt in the system message (merged into an existing one)."""
    prompt = tool_system_prompt(tools, choice)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": prompt + "\n\n" + messages[0]["content"]}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _literal_call(node: ast.AST) -> ToolCall | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)) or node.args:
        return None
    name = ast.unparse(node.func)
    try:
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:  # not a literal: a call that would need evaluating is not a tool call
        return None
    if None in args:  # **kwargs
        return None
    return ToolCall(name, args)


def _pythonic_at(text: str, i: int) -> tuple[list[ToolCall], int] | None:
    """Calls of a `[f(a=1), ...]` list starting at text[i] == '[', and where it ends."""
    depth = 0
    for j in range(i, len(text)):  # find candidate closing brackets; let ast judge each
        ch = text[j]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                try:
                    tree = ast.parse(text[i:j + 1], mode="eval")
                except SyntaxError:
                    continue
                if not isinstance(tree.body, ast.List) or not tree.body.elts:
                    return None
                calls = [_literal_call(e) for e in tree.body.elts]
                return (calls, j + 1) if all(calls) else None
    return None


def _json_call(obj: object) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type", "function") != "function":
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _json_at(text: str, i: int) -> tuple[list[ToolCall], int] | None:
    """One or more JSON calls starting at text[i] == '{' (separated by ';', ',' or whitespace)."""
    decoder, calls, j = json.JSONDecoder(), [], i
    while True:
        try:
            obj, end = decoder.raw_decode(text, j)
        except json.JSONDecodeError:
            break
        objs = obj if isinstance(obj, list) else [obj]
        found = [_json_call(o) for o in objs]
        if not found or not all(found):
            break
        calls += found
        j = end
        k = j
        while k < len(text) and text[k] in " \t\r\n;,":
            k += 1
        if k >= len(text) or text[k] not in "{[":
            break
        j = k
    return (calls, j) if calls else None


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text before the first call, the calls). Text without a call comes back whole with []."""
    clean = text.replace("<|python_start|>", "").replace("<|python_end|>", "")
    for i, ch in enumerate(clean):
        found = _pythonic_at(clean, i) if ch == "[" else _json_at(clean, i) if ch == "{" else None
        if found:
            calls, end = found
            rest = clean[end:]
            while rest.strip():  # more calls after the first group (another list or JSON object)
                k = len(rest) - len(rest.lstrip(" \t\r\n;,"))
                more = _pythonic_at(rest, k) if rest[k:k + 1] == "[" else _json_at(rest, k) if rest[k:k + 1] == "{" \
                    else None
                if not more:
                    break
                calls += more[0]
                rest = rest[more[1]:]
            return clean[:i].rstrip(), calls
    return text, []

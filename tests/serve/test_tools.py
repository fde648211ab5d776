"""Tool calls: the parser reads both forms Llama 4 checkpoints write (pythonic and JSON, also after text),
and a served model's call comes back as OpenAI `tool_calls`.

The end-to-end model is a real Llama4 whose weights are set by hand so that greedy decoding writes a
chosen text: every block's weights are zero (each residual stream stays its token's embedding) and the
output matrix maps each token's embedding to the next token of the text.
"""

from __future__ import annotations

import json

import pytest
import torch

import llama4
from conftest import LiveServer
from llama4.serve.tools import parse_tool_calls, with_tools

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = llama4.__file__.rsplit("/", 1)[0] + "/assets/default_model"
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city by its number",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "integer"}}}}}]


@pytest.mark.parametrize("text,content,calls", [
    ('[get_weather(city="Paris"), get_time(tz="CET")]', "",
     [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ('Let me look. [get_weather(city="Paris", days=2)]', "Let me look.", [("get_weather", {"city": "Paris", "days": 2})]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    ('Sure. {"name": "a", "parameters": {}}; {"name": "b", "arguments": "{\\"x\\": 1}"}', "Sure.",
     [("a", {}), ("b", {"x": 1})]),
    ('<|python_start|>{"name": "a", "parameters": {"q": [1, 2]}}<|python_end|>', "", [("a", {"q": [1, 2]})]),
    ('[f(a=1)]\n[g(b="x")]', "", [("f", {"a": 1}), ("g", {"b": "x"})]),
    ("a list [1, 2] and {not json}", "a list [1, 2] and {not json}", []),
    ('[f(a=__import__("os").system("id"))]', '[f(a=__import__("os").system("id"))]', []),  # never evaluated
    ("[f(1)]", "[f(1)]", []),  # positional arguments are not a tool call
])
def test_parser_reads_both_forms(text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls


def _scripted_model(tok, cfg, start_id: int, text: str) -> llama4.Llama4:
    """A model whose greedy continuation after `start_id` is `text` then <|eom|>."""
    ids = tok.encode(text)
    chain = [start_id, *ids, tok.eom_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "the scripted text needs distinct tokens"
    model = llama4.Llama4(cfg).init_weights(std=0.08, seed=3).eval()
    with torch.no_grad():
        for name, p in model.layers.named_parameters():
            if not name.endswith("norm.weight"):
                p.zero_()
        e_VD = model.tok_embeddings.weight
        model.norm.weight.fill_(1.0)
        model.output.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.output.weight[b] += 20 * e_VD[a] / e_VD[a].norm()
    return model


@pytest.mark.parametrize("script", ["[weather(city=7)]", "Sure. [weather(city=7)]"])
def test_tool_call_end_to_end(script):
    tok = llama4.Tokenizer(ASSET + "/tokenizer.json")
    cfg = llama4.load_config(ASSET)
    msgs = [{"role": "user", "content": "Weather in city 7?"}]
    prompt = tok.encode_chat(with_tools(msgs, TOOLS))
    model = _scripted_model(tok, cfg, prompt[-1], script)
    with LiveServer(model, tok) as s:
        client = s.client()
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0, max_tokens=30)
        choice = r.choices[0]
        assert r.usage.prompt_tokens == len(prompt)  # the tools are in the prompt
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": 7}
        assert choice.message.content == (script.split(" [")[0] if " [" in script else None)
        # Streaming gives the same call; tool_choice="none" gives the text itself.
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0,
                                                     max_tokens=30, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert [json.loads(d.tool_calls[0].function.arguments) for d in deltas] == [{"city": 7}]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # The tool's answer goes back as a `tool` message (rendered as ipython) and the chat continues.
        follow = [*msgs, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r2 = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, temperature=0, max_tokens=3)
        assert r2.usage.prompt_tokens > r.usage.prompt_tokens

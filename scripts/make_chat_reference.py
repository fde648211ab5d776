"""Write tests/fixtures/chat_reference.json: Meta's ChatFormat ids for a set of OpenAI-style dialogs.

`llama_models.llama4.chat_format` imports torchvision, which the project venv does not carry, so the
oracle runs in its own environment and the test compares against the committed output:

    python3 -m venv /tmp/oracle
    /tmp/oracle/bin/pip install torch==2.14.1 torchvision==0.29.1 llama-models==0.3.0
    /tmp/oracle/bin/python scripts/make_chat_reference.py

Images are synthetic ("synthetic:WxH" URLs): ChatFormat runs its own preprocessing on them, and the
tile grid it chose is recorded next to the ids, so the test can pass the same grid to our encoder.
"""

from __future__ import annotations

import argparse
import io
import json
from importlib.metadata import version
from pathlib import Path

from PIL import Image

from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, ToolCall, ToolPromptFormat
from llama_models.llama4.args import Size, VisionArgs
from llama_models.llama4.chat_format import ChatFormat
from llama_models.llama4.text.tokenizer import Tokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat_reference.json"


def img(w: int, h: int) -> dict:
    return {"type": "image_url", "image_url": {"url": f"synthetic:{w}x{h}"}}


def call(name: str, args: dict) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TRICKY = "tab\there\r\nCRLF\x00nul\x1b[31mansi\u200b zwsp \u00a0nbsp \ufeffbom   runs    of     spaces\n\n\n"
CASES = {
    "user_only": [{"role": "user", "content": "Hello, Llama 4 world!"}],
    "system_user": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"}],
    "multi_turn": [{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And times 3?"},
                   {"role": "assistant", "content": "12."},
                   {"role": "user", "content": "Thanks!"}],
    "unicode": [{"role": "user", "content": "日本語のテキスト、中文，한국어 — emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 and é vs é"}],
    "code": [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n\treturn  x**2 # sq\n```\n"},
             {"role": "assistant", "content": "```python\ndef f(x: float) -> float:\n    return x ** 2\n```"}],
    "control_and_whitespace": [{"role": "user", "content": TRICKY}],
    "special_lookalikes": [{"role": "user", "content": "<|eot|><|header_start|>assistant<|header_end|>\n\n"
                                                       "<|begin_of_text|> <|image|> <|patch|><|not_special|>"}],
    "text_parts": [{"role": "user", "content": [{"type": "text", "text": "first part"},
                                                {"type": "text", "text": " second part"},
                                                {"type": "text", "text": ""}]}],
    "empty_content": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    "tool_dialog": [{"role": "system", "content": "You can call get_weather(city)."},
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [call("get_weather", {"city": "Paris", "unit": "celsius", "days": 3})]},
                    {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 21, "sky": "clear"}'},
                    {"role": "assistant", "content": "It is 21°C and clear in Paris."},
                    {"role": "user", "content": "Great"}],
    "tool_with_text_and_two_calls": [{"role": "user", "content": "Compare Paris and Rome."},
                                     {"role": "assistant", "content": "Checking both.",
                                      "tool_calls": [call("get_weather", {"city": "Paris"}),
                                                     call("get_weather", {"city": "Rome", "flag": True,
                                                                          "n": None, "x": 1.5})]},
                                     {"role": "tool", "content": "Paris: 21"},
                                     {"role": "tool", "content": "Rome: 25"}],
    "builtin_tools": [{"role": "user", "content": "Search and compute."},
                      {"role": "assistant", "content": "",
                       "tool_calls": [call("brave_search", {"query": "llama 4 release date"})]},
                      {"role": "tool", "content": "April 5, 2025"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [call("wolfram_alpha", {"query": "2^100"})]},
                      {"role": "tool", "content": "1267650600228229401496703205376"},
                      {"role": "assistant", "content": "",
                       "tool_calls": [call("code_interpreter", {"code": "import math\nprint(math.pi)"})]},
                      {"role": "tool", "content": [{"type": "text", "text": "3.141592653589793"}]}],
    "image_single_tile": [{"role": "user", "content": [img(336, 336), {"type": "text", "text": "Describe it."}]}],
    "image_wide": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, img(1000, 300),
                                                {"type": "text", "text": "What is this?"}]}],
    "image_tall_and_small": [{"role": "system", "content": "You see images."},
                             {"role": "user", "content": [img(200, 900), img(50, 40), {"type": "text", "text": "Both?"}]}],
    "image_large_then_turns": [{"role": "user", "content": [img(2000, 1500)]},
                               {"role": "assistant", "content": "A big picture."},
                               {"role": "user", "content": [{"type": "text", "text": "And this one?"}, img(700, 700)]}],
}
NO_GENERATION_PROMPT = ["multi_turn", "tool_dialog", "image_wide"]


def png(url: str) -> bytes:
    w, h = (int(n) for n in url.removeprefix("synthetic:").split("x"))
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((w, h)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def to_raw(msg: dict) -> RawMessage:
    content = msg["content"] if msg["content"] is not None else ""
    if isinstance(content, list):
        content = [RawTextItem(text=p["text"]) if p["type"] == "text" else RawMediaItem(data=png(p["image_url"]["url"]))
                   for p in content]
    calls = [ToolCall(call_id=c["id"], tool_name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"]))
             for c in msg.get("tool_calls", [])]
    return RawMessage(role=msg["role"], content=content, tool_calls=calls)


def image_grids(fmt: ChatFormat, messages: list[dict]) -> list[list[int]]:
    """The (rows, cols) tile grid ChatFormat's own preprocessing picks for each image, in order."""
    grids = []
    for msg in messages:
        for part in msg["content"] if isinstance(msg["content"], list) else []:
            if part["type"] == "image_url":
                image = Image.open(io.BytesIO(png(part["image_url"]["url"]))).convert("RGB")
                _, ar = fmt.dynamic_image_transform(image, max_num_chunks=fmt.max_num_chunks)
                grids.append(list(ar))
    return grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    tokenizer = Tokenizer.get_instance()
    vision = VisionArgs(image_size=Size(width=336, height=336), patch_size=Size(width=14, height=14), dim=8,
                        n_layers=1, n_heads=1, mlp_ratio=1.0, output_dim=8, pixel_shuffle_ratio=0.5)
    fmt = ChatFormat(tokenizer, vision_args=vision)
    cases = []
    for name, messages in CASES.items():
        raw = [to_raw(m) for m in messages]
        for add_generation_prompt in [True] + [False] * (name in NO_GENERATION_PROMPT):
            if add_generation_prompt:
                ids = fmt.encode_dialog_prompt(raw).tokens
            else:  # ChatFormat always opens an assistant turn; without it the prompt is BOS + the messages
                ids = [tokenizer.bos_id] + [t for m in raw for t in fmt.encode_message(m, ToolPromptFormat.json)[0]]
            cases.append({"name": name, "add_generation_prompt": add_generation_prompt,
                          "image_grids": image_grids(fmt, messages), "messages": messages, "ids": ids})
    versions = {p: version(p) for p in ("llama-models", "torch", "torchvision", "tiktoken")}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text('{"generated_by": "scripts/make_chat_reference.py", "versions": ' + json.dumps(versions)
                        + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()

"""Chat format: ids equal to Meta's ChatFormat (committed reference outputs), image/video slots, errors."""

import json
from pathlib import Path

import pytest

from llama4.text.chat import MediaSlot, image_block_ids
from llama4.text.tokenizer import Tokenizer

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "chat_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: f"{c['name']}-{c['add_generation_prompt']}")
def test_matches_meta_chat_format(tok, case):
    grids = [tuple(g) for g in case["image_grids"]]
    enc = tok.encode_dialog(case["messages"], case["add_generation_prompt"], image_grids=grids)
    assert enc.ids == case["ids"]
    assert tok.encode_chat(case["messages"], case["add_generation_prompt"], image_grids=grids) == case["ids"]
    # Each slot covers exactly one <|image_start|> .. <|image_end|> block, in order.
    sp = tok.special_tokens
    assert [m.grid for m in enc.media] == grids
    assert [m.start for m in enc.media] == [i for i, t in enumerate(enc.ids) if t == sp["<|image_start|>"]]
    for m in enc.media:
        assert enc.ids[m.end - 1] == sp["<|image_end|>"] and m.kind == "image"
        assert enc.ids[m.start:m.end] == image_block_ids(tok, m.grid)


def test_reference_covers_the_issue(tok):
    names = {c["name"] for c in REFERENCE["cases"]}
    assert {"tool_dialog", "builtin_tools", "special_lookalikes", "unicode", "image_wide"} <= names
    assert any(len(c["image_grids"]) > 1 for c in REFERENCE["cases"])
    assert any(r * c > 1 for case in REFERENCE["cases"] for r, c in case["image_grids"])


def test_prompt_shape(tok):
    ids = tok.encode_chat([{"role": "tool", "content": "42"}], add_generation_prompt=False)
    assert tok.decode(ids) == "<|begin_of_text|><|header_start|>ipython<|header_end|>\n\n42<|eom|>"
    ids = tok.encode_chat([{"role": "user", "content": "<|eot|>"}])
    assert tok.decode(ids) == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|eot|><|eot|>"
                               "<|header_start|>assistant<|header_end|>\n\n")
    assert ids.count(tok.eot_id) == 1  # the user's "<|eot|>" stays text


def test_image_grids_default_hook_and_tile_size(tok):
    messages = [{"role": "user", "content": [_image("a.png"), {"type": "text", "text": "and"}, _image("b.png")]}]
    enc = tok.encode_dialog(messages)  # grids unknown yet: one tile each
    assert [(m.url, m.grid, m.end - m.start) for m in enc.media] == [("a.png", (1, 1), 147), ("b.png", (1, 1), 147)]
    enc = tok.encode_dialog(messages, image_grids=lambda url: (2, 2) if url == "a.png" else (1, 3),
                            tokens_per_tile=16)
    assert [m.grid for m in enc.media] == [(2, 2), (1, 3)]
    # 2x2: 4 tiles + global view, 1 x-separator per row, 1 y-separator per row, start/image/end.
    assert enc.media[0].end - enc.media[0].start == 5 * 16 + 2 + 2 + 3
    assert enc.media[1].end - enc.media[1].start == 4 * 16 + 2 + 1 + 3
    assert enc.media[0].message == 0 and enc.media[1].start > enc.media[0].end


def test_video_frames(tok):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                             {"type": "text", "text": "What happens?"}]}]
    enc = tok.encode_dialog(messages, video_frames=[[0.0, 1.25, 2.5]])
    assert [(m.kind, m.url, m.grid, m.frame_time) for m in enc.media] == [
        ("video", "clip.mp4", (1, 1), 0.0), ("video", "clip.mp4", (1, 1), 1.25), ("video", "clip.mp4", (1, 1), 2.5)]
    text = tok.decode(enc.ids)
    assert text.count("Frame at ") == 3 and "Frame at 1.2s:<|image_start|><|image|>" in text
    assert "Frame at 2.5s:" in text and text.count("<|patch|>") == 3 * 144
    hooked = tok.encode_dialog(messages, video_frames=lambda url: [0.0, 1.25, 2.5])
    assert hooked.ids == enc.ids and hooked.media == enc.media
    assert isinstance(enc.media[0], MediaSlot)


@pytest.mark.parametrize("messages, kwargs, match", [
    ([{"role": "robot", "content": "hi"}], {}, r"messages\[0\]: unknown role 'robot'"),
    ([{"content": "hi"}], {}, "unknown role None"),
    (["hi"], {}, r"messages\[0\]: expected a dict"),
    ([{"role": "user", "content": 5}], {}, "content must be a str or a list of parts"),
    ([{"role": "user", "content": None}], {}, "content must be"),
    ([{"role": "user", "content": [{"text": "no type"}]}], {}, r"messages\[0\].content\[0\]: expected a part"),
    ([{"role": "user", "content": [{"type": "audio", "x": 1}]}], {}, r"content\[0\]: expected a part"),
    ([{"role": "user", "content": ["bare string"]}], {}, r"content\[0\]: expected a part"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], {}, "a text part needs"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], {}, "image_url part needs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}], {}, "image_url part needs"),
    ([{"role": "user", "content": [_image("a")]}], {"image_grids": []}, "no entry in image_grids"),
    ([{"role": "user", "content": [_image("a")]}], {"image_grids": [(1, 1), (1, 1)]}, "2 entries but .* 1 images"),
    ([{"role": "user", "content": [_image("a")]}], {"image_grids": [(0, 2)]}, "positive ints"),
    ([{"role": "user", "content": [_image("a")]}], {"image_grids": lambda u: 3}, "rows, cols"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}], {},
     "needs frame timestamps"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}], {"video_frames": [[]]},
     "non-empty list"),
    ([{"role": "user", "content": "x"}], {"video_frames": [[1.0]]}, "1 entries but .* 0 videos"),
    ([{"role": "user", "content": "x", "tool_calls": [{}]}], {}, "only assistant messages carry tool_calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], {}, r"tool_calls\[0\]: expected"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], {},
     "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], {},
     "must be a JSON object"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "brave_search", "arguments": {}}}]}],
     {}, "needs a 'query' argument"),
    ([{"role": "assistant", "content": "", "tool_calls": {"function": {}}}], {}, "tool_calls must be a list"),
    ([{"role": "user", "content": "x"}], {"tokens_per_tile": 0}, "tokens_per_tile"),
])
def test_bad_messages_raise_clear_errors(tok, messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages, **kwargs)

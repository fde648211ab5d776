"""Self-contained saves: transformers' AutoTokenizer / apply_chat_template / processor settings read our
files and give our ids; `load` and the CLI read the generation and media settings back."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import llama4
from llama4.checkpoint.side_files import SideInfo
from llama4.cli.common import checkpoint_defaults
from llama4.cli.demo import default_model_path
from llama4.text.hf_export import tokenizer_files
from llama4.text.template import CHAT_TEMPLATE, render_chat_template

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "chat_reference.json").read_text(encoding="utf-8"))
# Cases a string template cannot reproduce id for id, and why (see text/template.py):
STRING_LIMITS = {
    "special_lookalikes": "special-token strings typed in a message become special tokens once rendered",
    "tool_with_text_and_two_calls": "'both.' + '{\"type\"' and '}' + '{' merge into one pre-token across the seam",
}
TEXTS = ["Hello, Llama 4 world!", "  leading spaces, 1234567 digits!!! ...\n\n\ttabs", "日本語 — emoji 👍🏽 é",
         "<|eot|> is plain text here"]


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    """The published tokenizer's files as a save writes them (tiktoken ranks converted to tokenizer.json)."""
    d = tmp_path_factory.mktemp("published_tok")
    for name, data in tokenizer_files(llama4.Tokenizer(), 10485760).items():
        (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def hf_published(published_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(published_dir)


def hf_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as HF's convention has them: tool-call arguments as dicts."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            args = call["function"].get("arguments")
            if isinstance(args, str):
                call["function"]["arguments"] = json.loads(args) if args.strip() else {}
    return out


def processor_expand(text: str, grids: list[list[int]], per_tile: int = 144) -> str:
    """What transformers' Llama4Processor does to each `<|image|>` once it knows the image's tile grid."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    split = Llama4Processor._prompt_split_image
    pieces = text.split("<|image|>")
    assert len(pieces) == len(grids) + 1
    return pieces[0] + "".join(split(None, grid, per_tile) + rest for grid, rest in zip(grids, pieces[1:]))


def test_autotokenizer_gives_our_ids(published_dir, hf_published):
    hf = hf_published
    ours = llama4.Tokenizer(published_dir)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>")
    for text in TEXTS[:3]:
        assert hf(text).input_ids == ours.encode(text, bos=True)
    assert hf.decode(ours.encode(TEXTS[2])) == TEXTS[2]


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: f"{c['name']}-{c['add_generation_prompt']}")
def test_apply_chat_template_equals_encode_chat(case, hf_published):
    hf = hf_published
    tok = llama4.Tokenizer()
    grids = [tuple(g) for g in case["image_grids"]]
    ours = tok.encode_chat(case["messages"], case["add_generation_prompt"], image_grids=grids)
    assert ours == case["ids"]  # the committed reference (Meta's ChatFormat)
    messages = hf_messages(case["messages"])
    text = hf.apply_chat_template(messages, add_generation_prompt=case["add_generation_prompt"], tokenize=False)
    assert text == render_chat_template(CHAT_TEMPLATE, messages, case["add_generation_prompt"])
    if case["name"] in STRING_LIMITS:
        assert text == tok.decode(ours)  # the same text; only the tokenization of typed specials differs
        return
    if grids:
        text = processor_expand(text, case["image_grids"])
    assert hf(text, add_special_tokens=False).input_ids == ours


def test_template_takes_openai_string_arguments(hf_published):
    hf = hf_published
    case = next(c for c in REFERENCE["cases"] if c["name"] == "tool_dialog")
    ids = hf.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == case["ids"]


def test_template_refuses_video_and_unknown_roles():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="video"):
        render_chat_template(CHAT_TEMPLATE, [{"role": "user", "content": [{"type": "video_url", "video_url": "v"}]}])
    with pytest.raises(TemplateError, match="unknown role"):
        render_chat_template(CHAT_TEMPLATE, [{"role": "robot", "content": "hi"}])


@pytest.fixture(scope="module")
def saved_default(tmp_path_factory):
    """The shipped default model (trained BPE tokenizer, vision, 4 video frames) saved again."""
    model = llama4.load(default_model_path())
    out = tmp_path_factory.mktemp("saved") / "default"
    llama4.save(model, out)
    return model, out


def test_save_writes_every_side_file(saved_default):
    model, out = saved_default
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "preprocessor_config.json", "processor_config.json", "media_config.json"):
        assert (out / name).is_file(), name
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == CHAT_TEMPLATE and conf["pad_token"] == "<|finetune_right_pad|>"
    gen = json.loads((out / "generation_config.json").read_text())
    t = model.config.text
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (t.bos_token_id, t.eos_token_id,
                                                                               t.pad_token_id)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 56, "width": 56} and pre["image_mean"] == [0.5] * 3
    assert json.loads((out / "processor_config.json").read_text())["patch_size"] == 14


def test_saved_tokenizer_reads_back_in_transformers_and_here(saved_default):
    from transformers import AutoTokenizer

    model, out = saved_default
    ours = llama4.Tokenizer(default_model_path())
    hf = AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:3]:
        assert hf(text).input_ids == ours.encode(text, bos=True) == llama4.Tokenizer(out).encode(text, bos=True)
    # Special-token strings in plain text: ours keeps them text; transformers does when asked to.
    assert hf(TEXTS[3], split_special_tokens=True).input_ids == ours.encode(TEXTS[3], bos=True)
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                         {"type": "text", "text": "What colour is the circle?"}]}]
    text = processor_expand(hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), [[1, 1]],
                            model.config.vision.tokens_per_tile)
    assert hf(text, add_special_tokens=False).input_ids == ours.encode_chat(
        chat, image_grids=[(1, 1)], tokens_per_tile=model.config.vision.tokens_per_tile)


def test_media_and_generation_settings_read_back(saved_default, tmp_path):
    model, out = saved_default
    again = llama4.load(out)
    assert again.side_info.media == {"num_frames": 4}  # the shipped model was trained on 4 frames
    args = argparse.Namespace(num_frames=None, max_tiles=None, temperature=None, top_p=0.5, top_k=None, min_p=None,
                              repetition_penalty=None, max_new_tokens=None)
    checkpoint_defaults(args, again)
    assert (args.num_frames, args.max_tiles, args.temperature, args.top_p) == (4, 16, 0.0, 0.5)

    again.side_info.generation = {"temperature": 0.6, "top_p": 0.9}  # the published Instruct defaults
    llama4.save(again, tmp_path / "sampled")
    gen = json.loads((tmp_path / "sampled" / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    args = argparse.Namespace(num_frames=2, temperature=None, top_p=None, top_k=None, min_p=None,
                              repetition_penalty=None, max_new_tokens=None)
    checkpoint_defaults(args, llama4.load(tmp_path / "sampled"))
    assert (args.num_frames, args.temperature, args.top_p, args.top_k) == (2, 0.6, 0.9, 0)  # flags win


def test_save_refuses_a_tokenizer_of_another_model(tmp_path):
    model = llama4.load(default_model_path())
    with pytest.raises(ValueError, match="does not belong"):
        llama4.save(model, tmp_path / "x", tokenizer=llama4.Tokenizer())
    assert not (tmp_path / "x").exists()


def test_bad_side_files_are_named(saved_default, tmp_path):
    import shutil

    _, out = saved_default
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "media_config.json").write_text('{"num_frames": 0}')
    with pytest.raises(ValueError, match="media_config.json.*num_frames"):
        llama4.load(bad)
    (bad / "media_config.json").write_text('{"num_frames": 4}')
    (bad / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match="generation_config.json.*temperature"):
        llama4.load(bad)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers' Llama4ImageProcessor needs torchvision (not in this environment)")
def test_autoprocessor_gives_our_ids_and_pixels(saved_default):
    from PIL import Image
    from transformers import AutoProcessor

    model, out = saved_default
    proc = AutoProcessor.from_pretrained(out)
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    got = proc(text=text, images=[image], return_tensors="pt", add_special_tokens=False)
    tiles, grid = llama4.preprocess_image(image, tile_size=56, max_tiles=16)
    tok = llama4.Tokenizer(out)
    assert got["input_ids"][0].tolist() == tok.encode_chat(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                      {"type": "text", "text": "Colour?"}]}], image_grids=[grid], tokens_per_tile=4)
    assert torch.allclose(got["pixel_values"], tiles, atol=1e-5)

"""Chat messages with images and videos -> ids with `<|patch|>` slots and the tiles that fill them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import llama4
from llama4.media.image import preprocess_image
from llama4.media.prompt import encode_prompt, user_message
from llama4.text.tokenizer import Tokenizer

TILE = 56  # the tiny preset's tile side: 4 <|patch|> slots per tile


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return llama4.preset("tiny").replace(num_hidden_layers=1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A wide image (2 tiles + thumbnail at 56 px), a small one (1 tile) and a 4-frame video."""
    from llama4.data.synth import write_video

    root = tmp_path_factory.mktemp("media")
    Image.linear_gradient("L").convert("RGB").resize((112, 50)).save(root / "wide.png")
    Image.new("RGB", (30, 30), (200, 30, 30)).save(root / "small.png")
    frames = [Image.new("RGB", (64, 64), (40 * i, 100, 250 - 40 * i)) for i in range(8)]
    write_video(frames, root / "clip.mp4", fps=2)
    return root


def test_images_and_video_fill_their_slots_in_order(tok, cfg, media):
    messages = [{"role": "system", "content": "Be brief."},
                user_message("What changed?", images=[media / "wide.png", media / "small.png"],
                             videos=[media / "clip.mp4"])]
    p = encode_prompt(tok, messages, cfg, num_frames=4)
    wide, grid = preprocess_image(media / "wide.png", tile_size=TILE)
    small, _ = preprocess_image(media / "small.png", tile_size=TILE)
    assert grid == (1, 2) and wide.shape[0] == 3 and small.shape[0] == 1
    assert p.pixel_values.shape == (3 + 1 + 4, 3, TILE, TILE)
    assert torch.equal(p.pixel_values[:3], wide) and torch.equal(p.pixel_values[3:4], small)
    assert [m.kind for m in p.media] == ["image", "image"] + ["video"] * 4
    assert [m.grid for m in p.media] == [(1, 2), (1, 1)] + [(1, 1)] * 4
    patch = tok.special_tokens["<|patch|>"]
    assert sum(t == patch for t in p.ids) == 8 * 4
    assert "Frame at" in tok.decode(p.ids) and p.ids[-1] == tok.encode("\n\n")[-1]
    # The model takes them as they are: every tile's features land in its own slots.
    model = llama4.Llama4(cfg).init_weights(std=0.05, seed=0)
    ids = torch.tensor([p.ids])
    with torch.no_grad():
        embeds = model.embed(ids, p.pixel_values)
        feats = model.vision(p.pixel_values)
    assert torch.equal(embeds[0][ids[0] == patch], feats.reshape(-1, feats.shape[-1]))


def test_text_only_messages_have_no_pixels(tok, cfg):
    p = encode_prompt(tok, [user_message("Hello")], cfg)
    assert p.pixel_values is None and p.media == []
    assert p.ids == tok.encode_chat([{"role": "user", "content": "Hello"}])


def test_errors_name_the_problem(tok, cfg, media, tmp_path):
    text_only = llama4.preset("tiny")
    text_only.vision = None
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: the prompt has image_url parts but this "
                                         r"model is text-only"):
        encode_prompt(tok, [user_message("hi", images=[media / "small.png"])], text_only)
    other = llama4.preset("tiny")
    other.image_token_index = 5
    with pytest.raises(ValueError, match="<\\|patch\\|> id 200092 differs from the model's image_token_index 5"):
        encode_prompt(tok, [user_message("hi", images=[media / "small.png"])], other)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        encode_prompt(tok, [user_message("hi", images=[tmp_path / "missing.png"])], cfg)
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: image_url part needs"):
        encode_prompt(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], cfg)

"""Vision tower, pixel shuffle and early fusion against transformers' Llama 4 on a tiny random checkpoint.

The oracle for fused logits is the body of `Llama4ForConditionalGeneration.forward` (image features
from the vision model, projector, its placeholder mask, masked_scatter, then the language model): in
transformers 5.x the method itself fails on building its return value ("no attribute image_outputs").
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import llama4
from conftest import hf_model, rel_err, save_hf, small_text
from llama4.model.vision import pixel_shuffle, vision_rope_freqs

PATCH, IMAGE, IMAGE_START, IMAGE_END, TILE_X, TILE_Y = 500, 501, 502, 503, 504, 505


def mm_config() -> llama4.Llama4Config:
    """Small text model + the `tiny` preset's vision tower (56-px tiles -> 4 tokens per tile)."""
    cfg = small_text()
    cfg.vision = llama4.preset("tiny").vision
    cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index = PATCH, IMAGE_START, IMAGE_END
    return cfg


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained directory, that directory)."""
    hf = hf_model(mm_config(), seed=7)
    path = save_hf(hf, tmp_path_factory.mktemp("vision") / "mm")
    return hf, llama4.load(path), path


def image_ids(rows: int, cols: int, per_tile: int) -> list[int]:
    """The published token layout of one image split into rows x cols tiles (+ a global view if > 1)."""
    ids = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                ids += [PATCH] * per_tile + ([TILE_X] if c < cols - 1 else [])
            ids.append(TILE_Y)
    ids += [IMAGE] + [PATCH] * per_tile + [IMAGE_END]
    return ids


def n_tiles(rows: int, cols: int) -> int:
    return rows * cols + (rows * cols > 1)


def prompt(images: list[tuple[int, int]], per_tile: int, seed: int, text: int = 9) -> list[int]:
    """Random text with the given images (rows, cols) interleaved."""
    g = torch.Generator().manual_seed(seed)
    words = lambda: torch.randint(3, 400, (text,), generator=g).tolist()  # noqa: E731
    ids = words()
    for rows, cols in images:
        ids += image_ids(rows, cols, per_tile) + words()
    return ids


def batch(rows_of_images: list[list[tuple[int, int]]], per_tile: int, pad: int = 0):
    """Right-padded ids [B, T] and all tiles of all rows, in prompt order."""
    seqs = [prompt(imgs, per_tile, seed=i) for i, imgs in enumerate(rows_of_images)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    tiles = sum(n_tiles(r, c) for imgs in rows_of_images for r, c in imgs)
    pixels = torch.rand(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return ids, pixels


def hf_fused_logits(hf, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        feats = hf.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
        projected = hf.multi_modal_projector(feats.view(-1, feats.size(-1)))
        mask = hf.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
        return hf.language_model(inputs_embeds=embeds.masked_scatter(mask, projected)).logits


# Vision tower ------------------------------------------------------------------------------------

def test_vision_tower_and_projector_parity(pair):
    hf, ours, _ = pair
    pixels = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        ref = hf.multi_modal_projector(hf.vision_model(pixels).last_hidden_state)
        got = ours.vision(pixels)
    assert got.shape == ref.shape == (5, 4, 64)
    assert ref.abs().max() > 0.1  # lively weights: a wrong layer would show
    assert rel_err(got, ref) <= 1e-5


def test_scout_tower_geometry_parity():
    """Scout's real shapes (336-px tiles, 24x24 patches, width 1408, head dim 88, 144 tokens per tile),
    one layer deep, weights mapped through the checkpoint key map."""
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    from llama4.checkpoint import KeyMap
    from llama4.model.vision import VisionEncoder

    v = dataclasses.replace(llama4.preset("scout").vision, num_hidden_layers=1)
    d = dataclasses.asdict(v)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    hf_v = Llama4VisionConfig(**d)
    with torch.device("meta"):
        tower = Llama4VisionModel(hf_v)
    tower = tower.to_empty(device="cpu").eval()
    tower.rotary_embedding.freqs_ci = type(tower.rotary_embedding)._compute_freqs_ci(hf_v)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name and name.endswith("weight")
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    keymap = KeyMap(multimodal=True)
    state = {keymap.from_hf(f"vision_model.{k}").removeprefix("vision."): t for k, t in tower.state_dict().items()}
    state["projector.weight"] = torch.randn(64, 4096, generator=g) * 4096 ** -0.5
    ours = VisionEncoder(v, text_dim=64).eval()
    ours.load_state_dict(state, strict=True)
    pixels = torch.rand(1, 3, 336, 336, generator=g) * 2 - 1
    with torch.no_grad():
        ref = tower(pixels).last_hidden_state @ state["projector.weight"].T
        got = ours(pixels)
    assert got.shape == ref.shape == (1, 144, 64)
    assert rel_err(got, ref) <= 1e-5


def test_vision_rope_matches_transformers():
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    v = llama4.VisionConfig(image_size=112, patch_size=14, hidden_size=128, num_attention_heads=4,
                            intermediate_size=512)
    hc = Llama4VisionConfig(image_size=112, patch_size=14, hidden_size=128, num_attention_heads=4)
    ref = Llama4VisionRotaryEmbedding._compute_freqs_ci(hc).squeeze(1)
    got = vision_rope_freqs(v)
    assert got.shape == ref.shape == (8 * 8 + 1, 16)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.all(got[-1] == 1)  # the class token is not rotated


def test_pixel_shuffle_matches_transformers_and_groups_2x2_blocks():
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

    x = torch.randn(3, 36, 8)
    assert torch.equal(pixel_shuffle(x, 0.5), hf_pixel_shuffle(x, 0.5))
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 patch grid, one feature = its index
    out = pixel_shuffle(grid, 0.5)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_vision_config_rejects_widths_transformers_cannot_run():
    with pytest.raises(ValueError, match="intermediate_size=128 must equal"):
        llama4.VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=56,
                            projector_input_dim=128, projector_output_dim=128, vision_output_dim=128)
    with pytest.raises(ValueError, match="vision_output_dim"):
        llama4.VisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=56,
                            projector_input_dim=128, projector_output_dim=128, vision_output_dim=256)
    with pytest.raises(ValueError, match="pixel-shuffled"):
        llama4.VisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=42,
                            projector_input_dim=128, projector_output_dim=128, vision_output_dim=128)


def test_wrong_tile_size_is_rejected(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"\[N, 3, 56, 56\], got \(2, 3, 64, 64\)"):
        ours.vision(torch.randn(2, 3, 64, 64))


# Early fusion ------------------------------------------------------------------------------------

CASES = {
    "one_multi_tile_image": [[(2, 2)]],  # 4 tiles + global view, one row
    "several_images": [[(1, 2), (1, 1), (2, 1)]],
    "batch_of_rows": [[(1, 2), (1, 1)], [(1, 1)], [(2, 2)]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_logits_parity(pair, case):
    hf, ours, _ = pair
    ids, pixels = batch(CASES[case], per_tile=4)
    ref = hf_fused_logits(hf, ids, pixels)
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels)
        text_only = ours(ids)
    assert got.shape == ref.shape == (*ids.shape, 512)
    assert rel_err(got, ref) <= 1e-4
    assert rel_err(text_only, ref) > 1e-2  # the images really changed the logits


def test_tiles_fill_slots_in_order(pair):
    """Feature rows land in slot order across images and batch rows: swapping two tiles swaps exactly
    those two runs of slots."""
    _, ours, _ = pair
    ids, pixels = batch([[(1, 1)], [(1, 1)]], per_tile=4)
    with torch.no_grad():
        a = ours.embed(ids, pixels)
        b = ours.embed(ids, pixels.flip(0))
        feats = ours.vision(pixels)
    slots = ids == PATCH
    assert torch.equal(a[0][slots[0]], feats[0]) and torch.equal(a[1][slots[1]], feats[1])
    assert torch.equal(b[0][slots[0]], feats[1]) and torch.equal(b[1][slots[1]], feats[0])
    assert torch.equal(a[~slots], ours.tok_embeddings(ids)[~slots])


@pytest.mark.parametrize("images, tiles, counts", [
    ([[(1, 1)]], 2, "4 slots .*per row \\[4\\]\\) but pixel_values has 2 tiles x 4 tokens = 8"),
    ([[(1, 2)], [(1, 1)]], 3, "16 slots .*per row \\[12, 4\\]\\) but pixel_values has 3 tiles"),
])
def test_slot_mismatch_is_a_clear_error(pair, images, tiles, counts):
    _, ours, _ = pair
    ids, _ = batch(images, per_tile=4)
    with pytest.raises(ValueError, match=f"do not match <\\|patch\\|> slots: input_ids hold {counts}"):
        ours(ids, pixel_values=torch.zeros(tiles, 3, 56, 56))


def test_pixels_without_slots_or_tower_are_errors(pair):
    _, ours, _ = pair
    ids = torch.randint(3, 400, (1, 12))
    with pytest.raises(ValueError, match="input_ids hold 0 slots"):
        ours(ids, pixel_values=torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match=r"tiles \[N, C, S, S\], got shape \(3, 56, 56\)"):
        ours(ids, pixel_values=torch.zeros(3, 56, 56))
    text_only = llama4.Llama4(small_text(num_hidden_layers=1)).init_weights(seed=0)
    with pytest.raises(ValueError, match="no vision encoder"):
        text_only(ids, pixel_values=torch.zeros(1, 3, 56, 56))


def test_text_only_calls_never_run_the_tower(pair, monkeypatch):
    _, ours, _ = pair
    ids, _ = batch([[(1, 1)]], per_tile=4)

    def boom(*_):
        raise AssertionError("vision tower ran on a text-only call")

    monkeypatch.setattr(ours.vision, "forward", boom)
    with torch.no_grad():
        assert torch.equal(ours.embed(ids), ours.tok_embeddings(ids))
        ours(ids)


# Checkpoints ---------------------------------------------------------------------------------------

def test_multimodal_save_round_trip_is_bit_exact_and_loads_in_transformers(pair, tmp_path):
    from transformers import Llama4ForConditionalGeneration

    hf, ours, src = pair
    out = llama4.save(ours, tmp_path / "saved")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("vision_model.") for k in b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    again = Llama4ForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = batch([[(1, 2)], [(1, 1)]], per_tile=4)
    assert torch.equal(hf_fused_logits(again, ids, pixels), hf_fused_logits(hf, ids, pixels))
    with torch.no_grad():
        assert torch.equal(llama4.load(out)(ids, pixel_values=pixels), ours(ids, pixel_values=pixels))


def test_dtype_casts_keep_the_rope_rotations():
    """`model.to(dtype)` must not touch the tower's complex RoPE table (a complex buffer would lose its
    imaginary part: about 3% off here, against ~1e-7 for a faithful float64 copy)."""
    model = llama4.Llama4(mm_config()).init_weights(std=0.08, seed=0)
    ids, pixels = batch([[(1, 2)]], per_tile=4)
    with torch.no_grad():
        ref = model.vision(pixels)
        assert rel_err(model.to(torch.float64).vision(pixels.double()), ref) <= 1e-5
        logits = model.to(torch.bfloat16)(ids, pixel_values=pixels)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()

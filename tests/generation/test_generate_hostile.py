"""generate and the model refuse hostile arguments up front, with clear errors, or handle them safely."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text
from llama4.generation.sampling import SamplingParams, sample

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text()).init_weights(std=0.08, seed=0).eval()


def test_tiny_temperature_tends_to_greedy(model):
    """1e-45 used to turn every logit into +-inf, the softmax into NaN and multinomial into a RuntimeError.
    The row maximum is subtracted first, so the distribution tends to greedy as it should."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5
    for t in (1e-45, 1e-30, 1e-8):
        assert torch.equal(sample(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(1)),
                           logits.argmax(-1))
    prompt = [5, 6, 7]
    assert llama4.generate(model, prompt, max_new_tokens=4, temperature=1e-45, seed=0, stop_ids=[]) == \
        llama4.generate(model, prompt, max_new_tokens=4, stop_ids=[])


@pytest.mark.parametrize("seed", [2**70, -2**64, 1.5])
def test_bad_seed_refused_before_the_first_token(model, seed):
    with pytest.raises(ValueError, match="seed="):
        llama4.generate_stream(model, [1, 2], max_new_tokens=2, temperature=1.0, seed=seed)  # no next() needed


def test_empty_batch_refused(model):
    with pytest.raises(ValueError, match=r"B >= 1 and T >= 1, got \(0, 5\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(0, 5))


def test_pixel_values_must_be_finite_normalised_floats():
    cfg = llama4.preset("tiny").replace(num_hidden_layers=2, vocab_size=512, bos_token_id=1, eos_token_id=[2],
                                        pad_token_id=0)
    cfg.image_token_index = 7
    m = llama4.Llama4(cfg).init_weights(seed=0).eval()
    ids = torch.tensor([[1] + [7] * cfg.vision.tokens_per_tile + [3]])
    good = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    m(ids, pixel_values=good)
    with pytest.raises(ValueError, match="NaN or infinite"):
        m(ids, pixel_values=torch.full_like(good, float("nan")))
    with pytest.raises(ValueError, match="dtype torch.uint8.*raw uint8 pixels are not accepted"):
        m(ids, pixel_values=good.to(torch.uint8))

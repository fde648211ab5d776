"""The compiled decode step end to end (inductor): same tokens as eager, through the API and the CLI."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_generate_compiled_equals_eager():
    model = llama4.Llama4(small_text()).init_weights(std=0.08, seed=7).eval()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 45)]
    for p in prompts:  # the second prompt reuses the compiled graph (same store shapes)
        kw = dict(max_new_tokens=12, stop_ids=[])
        assert llama4.generate(model, p, compile=True, **kw) == llama4.generate(model, p, **kw)
    sampled = dict(max_new_tokens=8, stop_ids=[], temperature=0.8, top_p=0.9, seed=3)
    assert llama4.generate(model, prompts[0], compile=True, **sampled) == llama4.generate(model, prompts[0], **sampled)

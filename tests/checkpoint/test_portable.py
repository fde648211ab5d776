"""Portable weights: a save that keeps a routing bias says so loudly and records it in config.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import llama4
from conftest import small_text
from llama4.checkpoint.hf import BIAS_KEY


def biased_model() -> llama4.Llama4:
    model = llama4.Llama4(small_text()).init_weights(seed=0).eval()
    model.layers[2].feed_forward.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.1]))
    return model


def test_a_routing_bias_is_announced_at_save_and_recorded_in_config(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llama4"):
        llama4.save(biased_model(), tmp_path / "c")
    assert "THIS MODEL IS NOT PORTABLE" in caplog.text and "DIFFERENT model" in caplog.text
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert next(iter(cfg)) == BIAS_KEY  # the first key of config.json
    assert cfg[BIAS_KEY]["file"] == "expert_bias.json" and cfg[BIAS_KEY]["layers"] == [2]
    assert "transformers, vLLM, llama.cpp" in cfg[BIAS_KEY]["warning"]
    back = llama4.load(tmp_path / "c")  # llama4 reads it back, bias and all
    assert back.layers[2].feed_forward.expert_bias.tolist() == [0.5, -0.5, 0.0, pytest.approx(0.1)]


def test_portable_saves_have_no_record(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llama4"):
        llama4.save(llama4.Llama4(small_text()).init_weights(seed=0), tmp_path / "c")
    assert "NOT PORTABLE" not in caplog.text
    assert BIAS_KEY not in json.loads((tmp_path / "c" / "config.json").read_text())
    assert not (tmp_path / "c" / "expert_bias.json").exists()


def test_a_recorded_bias_whose_file_is_gone_is_an_error(tmp_path):
    llama4.save(biased_model(), tmp_path / "c")
    (tmp_path / "c" / "expert_bias.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json records a routing bias .*expert_bias\.json is missing"):
        llama4.load(tmp_path / "c")


def test_transformers_still_reads_the_config(tmp_path):
    from transformers import AutoConfig

    llama4.save(biased_model(), tmp_path / "c")
    cfg = AutoConfig.from_pretrained(tmp_path / "c")
    assert "NOT PORTABLE" in getattr(cfg, BIAS_KEY)["warning"]  # kept on the config, visible to its users

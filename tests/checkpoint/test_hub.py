"""Hub ids resolve from the local Hugging Face cache (huggingface_hub, local_files_only): never downloaded."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a lookup that tried the network would fail loudly
    return tmp_path / "hub"


def test_hub_id_loads_the_cached_snapshot(hub_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--meta-llama--Llama-4-Scout-17B-16E-Instruct"
    model = llama4.Llama4(small_text()).init_weights(seed=1)
    llama4.save(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = llama4.load("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    assert torch.equal(loaded.output.weight, model.output.weight)


def test_hub_id_not_in_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"meta-llama/Llama-4-Maverick-17B-128E-Instruct: no such directory, "
                                                r"and the Hub id is not in the local Hugging Face cache.*never downloads"):
        llama4.load("meta-llama/Llama-4-Maverick-17B-128E-Instruct")


def test_cli_reports_a_missing_hub_id(hub_cache, capsys):
    from llama4.cli import main

    assert main(["generate", "--model", "meta-llama/Nope", "--prompt", "hi"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err

"""Training configs and data that used to crash deep inside torch get errors naming the key or line."""

from __future__ import annotations

import json

import pytest

from llama4.train.config import config_from_dict
from llama4.train.loop import run
from test_train import text_config
from test_train_parts import corpus_text, tok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.mark.parametrize("section,values,message", [
    ("optim", {"betas": ["0.9", "0.95"]}, r"optim\.betas = \[.0\.9., .0\.95.\] has the wrong type"),
    ("train", {"device": "tpu"}, "train.device = 'tpu' is not a device"),
    ("train", {"device": "gpu0"}, "train.device = 'gpu0' is not a device"),
])
def test_bad_train_config_values(section, values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({section: values})


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["model"].update(text_only=False, vision_overrides={"patch_size": 0}),
     r"model\.vision_overrides: invalid vision config: patch_size=0 is invalid"),
    (lambda c: c["model"]["overrides"].update(rms_norm_eps=-1.0), r"model\.overrides: .*rms_norm_eps=-1.0 is invalid"),
    (lambda c: c["data"].update(seq_len=1 << 21), r"data\.seq_len=2097152 is beyond the model's window"),
])
def test_bad_model_settings_fail_before_training(tok, tmp_path, edit, message):
    cfg = text_config(tok, tmp_path)
    edit(cfg)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_cuda_without_cuda(tok, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = text_config(tok, tmp_path)
    cfg["train"]["device"] = "cuda"
    with pytest.raises(ValueError, match=r"train\.device = 'cuda', but this machine has no CUDA device"):
        run(cfg)


def test_jsonl_with_invalid_utf8_names_file_and_line(tok, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    cfg = text_config(tok, tmp_path)
    cfg["data"]["paths"] = [str(data)]
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not valid UTF-8"):
        run(cfg)


def test_progress_line_shows_tokens_per_second_and_threads(tok, tmp_path, capsys):
    cfg = text_config(tok, tmp_path)
    cfg["train"].update(progress=True, steps=2)
    run(cfg)
    line = capsys.readouterr().err
    assert "tok/s" in line and "(1 thread)" in line

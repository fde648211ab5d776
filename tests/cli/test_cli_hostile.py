"""CLI arguments and files that used to end in a traceback get one clear line and exit code 2."""

from __future__ import annotations

import json

import pytest

import llama4
from llama4.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "x", "--threads", "-1"],
    ["chat", "--model", "m", "--threads", "0"],
    ["train", "--threads", "-1"],
    ["eval", "--model", "m", "--threads", "-2"],
    ["demo", "--threads", "0"],
    ["inspect", "tiny", "--context", "-5"],
    ["inspect", "tiny", "--kv-bytes", "0"],
])
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_every_computing_command_takes_threads():
    parser = build_parser()
    for argv in (["generate", "--model", "m", "--prompt", "x"], ["chat", "--model", "m"], ["train"],
                 ["merge-lora", "b", "a", "o"], ["eval", "--model", "m"], ["demo"],
                 ["tokenizer", "train", "--corpus", "c", "--vocab-size", "300", "--out", "o"],
                 ["data", "synth", "--out", "o"]):
        assert parser.parse_args(argv + ["--threads", "3"]).threads == 3, argv
    assert "thread" in parser._subparsers._group_actions[0].choices["train"].format_help()


def test_tokenizer_train_non_utf8_corpus_and_out_file(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("hello world\ncaf\xe9 au lait\n".encode("latin-1"))
    out = tmp_path / "out"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "latin1.txt: line 2" in err and "not valid UTF-8" in err
    good = tmp_path / "good.txt"
    good.write_text("hello world " * 50)
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    assert main(["tokenizer", "train", "--corpus", str(good), "--vocab-size", "300", "--out", str(existing)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and existing.read_text() == "keep me"


def test_data_synth_out_is_a_file(tmp_path, capsys):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    assert main(["data", "synth", "--out", str(existing), "--train", "1", "--heldout", "1"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and existing.read_text() == "keep me"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import small_text

    root = tmp_path_factory.mktemp("base")
    llama4.save(llama4.Llama4(small_text()).init_weights(seed=0), root)
    return root


@pytest.mark.parametrize("config,weights,message", [
    ("{not json", b"", "not valid JSON"),
    ('[1, 2]', b"", "expected a PEFT LoRA adapter"),
    ('{"peft_type": "LORA", "r": "8", "lora_alpha": 16}', b"", "r='8'"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}', b"garbage",
     "not a readable safetensors file"),
])
def test_merge_lora_bad_adapter(base, tmp_path, capsys, config, weights, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    assert main(["merge-lora", str(base), str(adapter), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_inspect_meta_directory(tmp_path, capsys):
    params = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, ffn_dim_multiplier=1.2,
                  ffn_exp=2.0, norm_eps=1e-5, attention_chunk_size=8, rope_theta=500000.0, nope_layer_interval=2,
                  moe_args=dict(num_experts=4))
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert main(["inspect", str(tmp_path)]) == 0  # used to say "no config.json"
    out = capsys.readouterr().out
    assert "layers           4: 2 local" in out and "vocab 512" in out
    (tmp_path / "params.json").write_text(json.dumps(dict(params, ffn_exp="2")))
    assert main(["inspect", str(tmp_path)]) == 2
    assert "ffn_exp='2' is invalid" in capsys.readouterr().err

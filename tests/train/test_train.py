"""The training loop end to end on tiny models: loss falls (real text, synthetic multimodal set), resume is
exact, a kill during a save leaves the previous checkpoint intact, expert bias balances load, LoRA,
checkpoints readable as HF, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import llama4
from llama4.cli import main
from llama4.train import Trainer, checkpoints, config_from_dict, latest_checkpoint, run
from llama4.train.checkpointing import load_train_state

from test_train_parts import corpus_text, tok  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


def text_config(tok, tmp_path, **sections) -> dict:
    """A 2-layer text-only tiny model on the corpus: seconds per run on a loaded laptop CPU."""
    corpus = tmp_path / "corpus.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        corpus.write_text(corpus_text())
    cfg = {"model": {"preset": "tiny", "text_only": True, "overrides": {"num_hidden_layers": 2}},
           "data": {"paths": [str(corpus)], "tokenizer": str(tok.path), "seq_len": 64, "batch_size": 4},
           "optim": {"lr": 3e-3, "warmup_steps": 2},
           "train": {"steps": 6, "out_dir": str(tmp_path / "run"), "progress": False},
           "checkpoint": {"every": 0}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def losses(out_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_real_text_and_checkpoint_is_hf(tok, tmp_path):
    out = run(text_config(tok, tmp_path, train={"steps": 12}))
    ls = losses(out)
    assert len(ls) == 12 and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.5, ls
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "expert_load", "imbalance"} <= set(rows[0])
    assert (out / "loss.png").stat().st_size > 0 and (out / "expert_load.png").stat().st_size > 0
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_0000012" and (ckpt / "tokenizer.json").is_file()
    model = llama4.load(ckpt)
    # Portable by default (aux-loss balancing, no routing bias): transformers computes the trained model.
    assert "llama4_routing_bias" not in json.loads((ckpt / "config.json").read_text())
    assert not any(layer.feed_forward.expert_bias.any() for layer in model.layers if hasattr(layer.feed_forward,
                                                                                            "expert_bias"))
    assert rows[-1]["aux_loss"] is not None
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(ckpt)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    state, _ = load_train_state(ckpt)
    assert state["step"] == 12 and state["data"]["row"] > 0


def test_resume_continues_exactly(tok, tmp_path):
    sections = dict(train={"steps": 6, "grad_accum": 2, "seed": 1}, moe={"bias_update_rate": 0.05,
                    "aux_loss_coef": 0.01}, data={"seq_len": 48, "batch_size": 2})
    whole = run(text_config(tok, tmp_path / "a", **sections))
    cfg = text_config(tok, tmp_path / "b", **sections)
    first = Trainer(config_from_dict(cfg))
    for _ in range(3):  # an interrupted run: 3 steps, a checkpoint, then the process is gone
        first.train_step()
    first.save()
    del first
    resumed = run(cfg, resume=True)
    assert losses(resumed) == losses(whole)[3:]


KILL_SCRIPT = """
import os, signal, sys, json
import torch
from llama4.checkpoint import atomic
from llama4.train import run
torch.set_num_threads(1)
def die(op, path):  # the second checkpoint dies halfway: after the first step of its save
    if path.parent.name.startswith(".step_0000004"):
        os.kill(os.getpid(), signal.SIGKILL)
atomic.rename_hook = die
run(json.loads(sys.argv[1]))
"""


def test_kill_during_save_keeps_previous_checkpoint(tok, tmp_path):
    cfg = text_config(tok, tmp_path, train={"steps": 4}, checkpoint={"every": 2, "keep": 1})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / "run"
    assert [p.name for p in checkpoints(out)] == ["step_0000002"]
    assert any(p.name.startswith(".step_0000004.llama4-saving-") for p in (out / "checkpoints").iterdir())
    llama4.load(checkpoints(out)[0])  # intact
    run(cfg, resume=True)
    assert [p.name for p in checkpoints(out)] == ["step_0000004"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    # Killed at step 4, resumed from step 2: the same losses as a run that was never interrupted.
    whole = run(text_config(tok, tmp_path / "whole", train={"steps": 4}, checkpoint={"every": 2, "keep": 1}))
    assert losses(out) == losses(whole)


def test_never_saves_a_broken_model(tok, tmp_path):
    cfg = text_config(tok, tmp_path, train={"steps": 2}, checkpoint={"every": 1})
    trainer = Trainer(config_from_dict(cfg))
    trainer.train_step()
    good = trainer.save()
    with torch.no_grad():
        trainer.model.output.weight[0, 0] = float("nan")
    trainer.step = 2
    with pytest.raises(ValueError, match="not saving step 2: parameter output.weight holds NaN"):
        trainer.save()
    assert checkpoints(trainer.out) == [good]


def test_expert_bias_lowers_imbalance(tok, tmp_path):
    def mean_imbalance(rate, name):
        cfg = text_config(tok, tmp_path / name, train={"steps": 20}, optim={"lr": 3e-4},
                          moe={"bias_update_rate": rate, "aux_loss_coef": 0.0}, data={"seq_len": 32})
        rows = [json.loads(x) for x in (run(cfg) / "metrics.jsonl").read_text().splitlines()]
        return sum(r["imbalance"] for r in rows[-6:]) / 6  # busiest expert / mean, 1.0 = even

    without, with_bias = mean_imbalance(0.0, "off"), mean_imbalance(0.03, "on")
    print(f"imbalance without bias {without:.2f}, with bias {with_bias:.2f}")
    assert with_bias < without - 0.5, (with_bias, without)


def test_lora_fine_tune_trains_adapters_only(tok, tmp_path):
    # batch 3: with 4, the two +-rate bias updates cancelled exactly on this corpus (the files it is read from
    # changed); the biases must be non-zero for the check below to mean anything.
    base = run(text_config(tok, tmp_path / "base", train={"steps": 2}, data={"batch_size": 3},
                           moe={"bias_update_rate": 1e-3}))
    ckpt = latest_checkpoint(base)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"},
                                           {"role": "assistant", "content": "Paris is the capital."}]}) + "\n")
    cfg = text_config(tok, tmp_path / "ft", model={"preset": None, "checkpoint": str(ckpt)},
                      data={"paths": [str(qa)], "batch_size": 1}, optim={"lr": 1e-2},
                      lora={"enabled": True, "rank": 4}, train={"steps": 8})
    cfg["model"].pop("text_only")
    cfg["model"].pop("overrides")
    trainer = Trainer(config_from_dict(cfg))
    # The base run's expert biases come along (they are part of its routing).
    saved = json.loads((ckpt / "expert_bias.json").read_text())
    assert trainer.balancer.biases()["layers.1.feed_forward.expert_bias"].tolist() == \
        saved["layers.1.feed_forward.expert_bias"] != [0.0] * 4
    out = trainer.train()
    ls = losses(out)
    assert ls[-1] < ls[0] - 0.5, ls
    adapter = latest_checkpoint(out) / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (latest_checkpoint(out) / "model.safetensors").exists()
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(ckpt), str(adapter), str(merged)]) == 0
    a, b = llama4.load(ckpt), llama4.load(merged)
    assert not torch.equal(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)
    assert torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)  # not adapted
    tuned_bias = json.loads((adapter / "expert_bias.json").read_text())["layers.1.feed_forward.expert_bias"]
    assert b.layers[1].feed_forward.expert_bias.tolist() == tuned_bias  # the fine-tuning run's routing


def test_loss_falls_on_synthetic_multimodal_set(tok, tmp_path):
    from llama4.data.synth import make_dataset

    root = make_dataset(tmp_path / "syn", n_train=24, n_heldout=0, video_fraction=0.25, seed=0)
    cfg = text_config(tok, tmp_path, data={"paths": [str(root / "train.jsonl")], "seq_len": 256, "batch_size": 2,
                                           "video_frames": 4},
                      model={"text_only": False}, train={"steps": 8}, optim={"lr": 5e-3})
    ls = losses(run(cfg))
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.5, ls


def test_cli_train_with_overrides_and_errors(tok, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(corpus_text()[:4000])
    toml = tmp_path / "t.toml"
    toml.write_text(textwrap.dedent(f"""
        [model]
        preset = "tiny"
        text_only = true
        overrides = {{num_hidden_layers = 1}}
        [data]
        paths = ["corpus.txt"]
        tokenizer = "{tok.path}"
        seq_len = 32
        batch_size = 2
        [train]
        out_dir = "out"
        progress = false
    """))
    assert main(["train", "--config", str(toml), "train.steps=2", "checkpoint.every=1"]) == 0
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["step_0000001", "step_0000002"]
    assert main(["train", "--config", str(toml), "train.steps=3"]) == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err
    assert main(["train", "--config", str(toml), "train.stepz=2"]) == 2
    assert "unknown key(s) ['train.stepz']" in capsys.readouterr().err
    assert main(["train", "--config", str(toml), "--resume", "train.out_dir=elsewhere"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_step(tok, tmp_path):
    rows = []
    for ac in (False, True):
        trainer = Trainer(config_from_dict(text_config(tok, tmp_path / str(ac), moe={"aux_loss_coef": 0.01},
                                                       train={"activation_checkpointing": ac})))
        rows.append([trainer.train_step() for _ in range(2)])
    for a, b in zip(*rows):
        assert a["aux_loss"] > 0 and a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-6)
        assert a["expert_load"] == b["expert_load"]  # recomputes in backward are not counted again
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5)


def test_bf16_autocast_trains(tok, tmp_path):
    ls = losses(run(text_config(tok, tmp_path, train={"steps": 6, "bf16": True})))
    assert all(map(torch.isfinite, torch.tensor(ls))) and ls[-1] < ls[0]


def test_example_configs_parse():
    from pathlib import Path

    from llama4.train import load_train_config

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.toml"))
    assert examples
    for f in examples:
        cfg = load_train_config(f)
        assert cfg.data.paths and all(Path(p).is_absolute() for p in cfg.data.paths)

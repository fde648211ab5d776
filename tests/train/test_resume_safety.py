"""--resume is safe: nothing in a run directory is unpickled (a planted payload never runs), a changed run is
refused by key, a damaged newest checkpoint falls back to the previous one, and a training checkpoint
killed at any instant leaves a resumable run."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time

import pytest
import torch

from llama4.train import Trainer, checkpoints, config_from_dict, run

from conftest import in_child
from test_train import text_config
from test_train_parts import tok  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this creates a file: proof that code in the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(ckpt, marker):
    for f in (ckpt / "train_state").iterdir():
        f.unlink()
    (ckpt / "train_state").rmdir()
    torch.save({"step": Payload(str(marker))}, ckpt / "train_state.pt")


def test_planted_pickle_never_runs_on_resume(tok, tmp_path, caplog):
    cfg = text_config(tok, tmp_path, train={"steps": 2}, checkpoint={"every": 1, "keep": 2})
    out = run(cfg)
    marker = tmp_path / "pwned"
    plant_pickle(checkpoints(out)[-1], marker)
    with caplog.at_level(logging.WARNING, logger="llama4"):
        trainer = Trainer(config_from_dict(cfg), resume=True)  # falls back to the intact step 1
    assert not marker.exists()
    assert trainer.step == 1 and "train_state.pt: a pickled training state" in caplog.text
    assert "is never loaded" in caplog.text and "moved the damaged step_0000002 aside" in caplog.text
    assert (out / "checkpoints" / "step_0000002.damaged" / "train_state.pt").is_file()  # kept to inspect
    plant_pickle(checkpoints(out)[-1], marker)  # now the only checkpoint
    with pytest.raises(ValueError, match="no intact checkpoint"):
        Trainer(config_from_dict(cfg), resume=True)
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished(tok, tmp_path_factory):
    """A 2-step run with a checkpoint at each step."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = text_config(tok, tmp, train={"steps": 2}, checkpoint={"every": 1, "keep": 2})
    return cfg, run(cfg)


@pytest.mark.parametrize("section, key, value", [
    ("optim", "lr", 1e-3), ("data", "batch_size", 2), ("train", "grad_accum", 2), ("optim", "warmup_steps", 5),
    ("model", "overrides", {"num_hidden_layers": 3}), ("train", "seed", 7),
])
def test_resume_refuses_a_changed_run(finished, section, key, value):
    cfg, _ = finished
    changed = json.loads(json.dumps(cfg))
    changed[section][key] = value
    with pytest.raises(ValueError, match=rf"different configuration \({section}\.{key}: .* -> "):
        Trainer(config_from_dict(changed), resume=True)


def test_resume_applies_safe_changes(finished):
    cfg, out = finished
    longer = json.loads(json.dumps(cfg))
    longer["train"]["steps"] = 3
    longer["checkpoint"]["keep"] = 1
    run(longer, resume=True)
    assert [p.name for p in checkpoints(out)] == ["step_0000003"]


def test_damaged_newest_checkpoint_falls_back(tok, tmp_path, caplog):
    cfg = text_config(tok, tmp_path / "a", train={"steps": 4}, checkpoint={"every": 2, "keep": 2})
    out = run(cfg)
    shard = checkpoints(out)[-1] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="llama4"):
        run(cfg, resume=True)
    assert "step_0000004 is damaged or unreadable" in caplog.text and "truncated" in caplog.text
    assert [p.name for p in checkpoints(out)] == ["step_0000002", "step_0000004"]
    assert (out / "checkpoints" / "step_0000004.damaged").is_dir()
    whole = run(text_config(tok, tmp_path / "b", train={"steps": 4}, checkpoint={"every": 2, "keep": 2}))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]


# Killed training checkpoints --------------------------------------------------------------------------

def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def kill_points_for_training(tok, tmp_path, steps_to_kill, delays, same_step: bool) -> set:
    """Trainer at step 1 (saved); the child saves step 2 (or re-saves step 1 with new weights) and is killed.
    After each kill, --resume finds a complete checkpoint: the old one or the new one, exactly."""
    cfg = text_config(tok, tmp_path, train={"steps": 3}, checkpoint={"every": 0, "keep": 1})
    trainer = Trainer(config_from_dict(cfg))
    trainer.train_step()
    trainer.save()
    old = (1, weights(trainer.model))
    trainer.train_step()
    if same_step:
        trainer.step = 1
    new = (trainer.step, weights(trainer.model))
    ck = tmp_path / "run" / "checkpoints"
    pristine = tmp_path / "pristine"
    os.rename(ck, pristine)
    seen = set()
    for k, delay in [(k, None) for k in steps_to_kill] + [(None, d) for d in delays]:
        if ck.exists():
            shutil.rmtree(ck)
        shutil.copytree(pristine, ck)
        in_child(trainer.save, kill_after_step=k, kill_after_s=delay)
        resumed = Trainer(config_from_dict(cfg), resume=True)
        got = [name for name, (step, w) in (("old", old), ("new", new)) if resumed.step == step and
               all(torch.equal(resumed.model.state_dict()[key], w[key]) for key in w)]
        assert got, (k, delay, resumed.step)
        seen.add(got[0])
        resumed.save()  # the next save cleans what the killed one left
        assert not [p.name for p in ck.iterdir() if p.name.startswith(".")]
    return seen


def count_training_save_steps(tok, tmp_path, same_step: bool) -> tuple[int, float]:
    cfg = text_config(tok, tmp_path, train={"steps": 3}, checkpoint={"every": 0, "keep": 1})
    trainer = Trainer(config_from_dict(cfg))
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    if same_step:
        trainer.step = 1
    t0 = time.perf_counter()
    status, n = in_child(trainer.save)
    assert status == 0
    return n, time.perf_counter() - t0


def test_kill_during_training_checkpoint_fast(tok, tmp_path):
    n, _ = count_training_save_steps(tok, tmp_path / "count", same_step=False)
    assert kill_points_for_training(tok, tmp_path / "new", [1, n - 2, n], [], same_step=False) == {"old", "new"}
    n, _ = count_training_save_steps(tok, tmp_path / "count2", same_step=True)
    assert kill_points_for_training(tok, tmp_path / "same", [1, 2, n], [], same_step=True) == {"old", "new"}


@pytest.mark.slow
@pytest.mark.parametrize("same_step", [False, True])
def test_kill_during_training_checkpoint_every_step_and_random(tok, tmp_path, same_step):
    n, duration = count_training_save_steps(tok, tmp_path / "count", same_step)
    rng = random.Random(same_step)
    seen = kill_points_for_training(tok, tmp_path / "run", list(range(1, n + 1)),
                                    [rng.uniform(0, duration * 1.2) for _ in range(50)], same_step)
    assert seen == {"old", "new"}


def test_disk_full_during_training_checkpoint_names_enospc(tok, tmp_path, monkeypatch, capsys):
    import errno

    from llama4.checkpoint import atomic
    from llama4.cli import main

    cfg = text_config(tok, tmp_path, train={"steps": 2}, checkpoint={"every": 1, "keep": 2})
    def value(v):  # TOML: JSON scalars and lists read the same; tables are inline
        return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}" if isinstance(v, dict) else json.dumps(v)

    toml = tmp_path / "run.toml"
    toml.write_text("".join(f"[{sec}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in vals.items())
                            for sec, vals in cfg.items()))
    real_open = open

    def full_open(path, mode="r", *a, **k):  # the second checkpoint finds the disk full
        if mode == "wb" and "step_0000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(atomic, "open", full_open, raising=False)
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "disk full (ENOSPC" in err and "inline_container" not in err and "Traceback" not in err
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step_0000001"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step="2"), "malformed step"),
    (lambda s: s.update(data={"epoch": -1, "row": 0}), "malformed data"),
    (lambda s: s["rng"].update(numpy=[1]), "malformed rng"),
    (lambda s: s.pop("optimizer"), "a training state needs step, optimizer"),
])
def test_malformed_training_state_is_damage_not_a_traceback(tok, tmp_path, caplog, edit, message):
    cfg = text_config(tok, tmp_path, train={"steps": 1}, checkpoint={"every": 0})
    out = run(cfg)
    f = checkpoints(out)[-1] / "train_state" / "state.json"
    state = json.loads(f.read_text())
    edit(state)
    f.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="llama4"):
        with pytest.raises(ValueError, match="no intact checkpoint"):
            Trainer(config_from_dict(cfg), resume=True)
    assert f"state.json: {message}" in caplog.text

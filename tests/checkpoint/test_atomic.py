"""Atomic saves (checkpoint/atomic.py): a save killed at any instant leaves the old or the new checkpoint,
never a torn one, and never loses a file it did not write; leftovers are cleaned; symlinks, permissions,
foreign files and a full disk are handled."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import stat
import time

import pytest
import torch

import llama4
from llama4.checkpoint import atomic
from llama4.config import config_to_hf
from conftest import in_child, small_text

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int, layers: int, bias: bool) -> llama4.Llama4:
    model = llama4.Llama4(small_text(num_hidden_layers=layers, interleave_moe_layer_step=2,
                                     rope_theta=5e5 + seed)).init_weights(std=0.05, seed=seed)
    if bias:
        model.layers[1].feed_forward.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 0.125]))
    return model


@pytest.fixture(scope="module")
def models():
    # Two models that share nothing: layer count, weights, routing bias and config all differ.
    return {"A": make_model(1, 2, bias=True), "B": make_model(2, 4, bias=False)}


USER_FILES = {"notes.txt": "the user's own notes", "tokenizer.json": '{"user": 1}'}


def which(path, models) -> str:
    """'A' or 'B': the model `llama4.load(path)` gives, compared exactly (weights, biases, config)."""
    got = llama4.load(path)
    sd = got.state_dict()
    for name, m in models.items():
        ref = m.state_dict()
        if config_to_hf(got.config) == config_to_hf(m.config) and sd.keys() == ref.keys() and \
                all(torch.equal(sd[k], ref[k]) for k in ref):
            return name
    raise AssertionError(f"{path} loads neither the old nor the new checkpoint")


SCENARIOS = {  # old checkpoint (None: no target yet), new one, and their shard sizes
    "sharded->single": ("A", "60KB", "B", "5GB"),
    "single->sharded": ("B", "5GB", "A", "60KB"),
    "sharded->sharded": ("A", "60KB", "B", "100KB"),
    "fresh": (None, None, "B", "100KB"),
}


def prepare(tmp_path, models, scenario):
    old, old_shard, new, new_shard = SCENARIOS[scenario]
    target = tmp_path / "ckpt"
    if target.exists():
        shutil.rmtree(target)
    for p in tmp_path.iterdir():
        if p.name.startswith(".ckpt."):
            shutil.rmtree(p)
    if old is not None:
        llama4.save(models[old], target, max_shard_size=old_shard)
        for name, text in USER_FILES.items():
            (target / name).write_text(text)
    return target, lambda: llama4.save(models[new], target, max_shard_size=new_shard)


def check_after_kill(tmp_path, target, models, scenario):
    old, _, new, new_shard = SCENARIOS[scenario]
    if old is None and not target.exists():
        got = None
    else:
        got = which(target, models)
        assert got in (old, new)
    if old is not None:
        for name, text in USER_FILES.items():  # no user file is lost
            assert (target / name).read_text() == text, name
    # The next save finishes or discards what was killed and leaves no leftovers.
    llama4.save(models[new], target, max_shard_size=new_shard)
    assert which(target, models) == new
    hidden = sorted(p.name for p in target.iterdir() if p.name.startswith("."))
    assert hidden == [".llama4-save.json"], hidden
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]
    return got


def count_steps(tmp_path, models, scenario) -> tuple[int, float]:
    target, save = prepare(tmp_path, models, scenario)
    t0 = time.perf_counter()
    status, steps = in_child(save)
    assert status == 0 and steps > 2
    return steps, time.perf_counter() - t0


def kill_loop(tmp_path, models, scenario, steps: list[int], delays: list[float]) -> dict:
    seen = {}
    for k in steps:
        target, save = prepare(tmp_path, models, scenario)
        status, made = in_child(save, kill_after_step=k)
        assert os.WIFSIGNALED(status) and made == k, (scenario, k, status, made)
        got = check_after_kill(tmp_path, target, models, scenario)
        seen[got] = seen.get(got, 0) + 1
    for d in delays:
        target, save = prepare(tmp_path, models, scenario)
        in_child(save, kill_after_s=d)
        got = check_after_kill(tmp_path, target, models, scenario)
        seen[got] = seen.get(got, 0) + 1
    return seen


def test_kill_during_save_fast(models, tmp_path):
    """A few kill points of each kind: before the commit, at it, among the renames after it, at the end."""
    n, _ = count_steps(tmp_path, models, "sharded->single")
    seen = kill_loop(tmp_path, models, "sharded->single", [1, 2, n // 2, n - 1, n], [])
    assert set(seen) == {"A", "B"}  # both sides of the commit point were hit
    n, _ = count_steps(tmp_path, models, "fresh")
    assert set(kill_loop(tmp_path, models, "fresh", [1, n - 1, n], [])) == {None, "B"}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_during_save_every_step_and_random(models, tmp_path, scenario):
    """SIGKILL right after every rename/replace/delete of the save, and at 50 random instants."""
    n, duration = count_steps(tmp_path, models, scenario)
    rng = random.Random(scenario)
    seen = kill_loop(tmp_path, models, scenario, list(range(1, n + 1)),
                     [rng.uniform(0, duration * 1.2) for _ in range(50)])
    assert sum(seen.values()) == n + 50 and len(seen) == 2, seen


# Ownership, leftovers, symlinks, permissions -----------------------------------------------------------

def test_save_over_foreign_weights_is_refused(models, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=r"will not save over \['model.safetensors'\].*did not write"):
        llama4.save(models["A"], d)
    assert (d / "model.safetensors").read_bytes() == b"not ours"
    llama4.save(models["A"], tmp_path / "ours")
    (tmp_path / "ours" / "extra.safetensors").write_bytes(b"x")  # would be taken for weights
    with pytest.raises(ValueError, match=r"extra.safetensors"):
        llama4.save(models["B"], tmp_path / "ours")
    assert which(tmp_path / "ours", models) == "A"


def test_extra_files_refuse_to_replace_user_files_and_are_owned(models, tmp_path):
    target = tmp_path / "c"
    llama4.save(models["A"], target, extra_files={"generation_config.json": b"{}"})
    assert (target / "generation_config.json").read_bytes() == b"{}"
    (target / "tokenizer.json").write_text("mine")
    with pytest.raises(ValueError, match="tokenizer.json"):
        llama4.save(models["A"], target, extra_files={"tokenizer.json": b"{}"})
    assert (target / "tokenizer.json").read_text() == "mine"
    llama4.save(models["B"], target)  # ours, not rewritten and not weights: kept; the user's: kept
    assert (target / "generation_config.json").exists() and (target / "tokenizer.json").read_text() == "mine"
    llama4.save(models["B"], target, extra_files={"generation_config.json": b"[]"})  # ours: replaced
    assert (target / "generation_config.json").read_bytes() == b"[]"
    with pytest.raises(ValueError, match="written by llama4.save itself"):
        llama4.save(models["B"], target, extra_files={"config.json": b"{}"})


def test_leftovers_of_killed_saves_are_cleaned_and_only_ours(models, tmp_path):
    target, save = prepare(tmp_path, models, "sharded->single")
    n, _ = count_steps(tmp_path, models, "sharded->single")
    target, save = prepare(tmp_path, models, "sharded->single")
    in_child(save, kill_after_step=1)  # killed while writing its temporaries
    in_child(lambda: llama4.save(models["B"], tmp_path / "fresh"), kill_after_step=1)  # a staging dir
    (target / ".model.safetensors.llama4-tmp-999-abcd").write_bytes(b"user's, not in any manifest")
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".fresh.llama4-saving-")]
    llama4.save(models["B"], target)
    llama4.save(models["B"], tmp_path / "fresh")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    left = sorted(p.name for p in target.iterdir() if p.name.startswith("."))
    assert left == [".llama4-save.json", ".model.safetensors.llama4-tmp-999-abcd"]


def test_damaged_manifest_refuses_save_but_loads(models, tmp_path):
    target = tmp_path / "c"
    llama4.save(models["A"], target)
    (target / ".llama4-save.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"\.llama4-save\.json: damaged manifest"):
        llama4.save(models["B"], target)
    assert which(target, models) == "A"


def test_symlinked_target_is_written_through(models, tmp_path):
    real = tmp_path / "real"
    llama4.save(models["A"], real)
    link = tmp_path / "link"
    link.symlink_to(real)
    llama4.save(models["B"], link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert which(real, models) == "B" and which(link, models) == "B"


def test_directories_and_files_get_the_usual_permissions(models, tmp_path):
    old = os.umask(0o022)
    try:
        llama4.save(models["A"], tmp_path / "new" / "ckpt", max_shard_size="60KB")
    finally:
        os.umask(old)
    d = tmp_path / "new" / "ckpt"
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o644}


def test_disk_full_names_enospc_and_keeps_the_old_checkpoint(models, tmp_path, monkeypatch):
    target = tmp_path / "c"
    llama4.save(models["A"], target)
    real_open = open

    class Full:
        """A file on a disk with 50 kB left."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(memoryview(data).cast("B"))
            if self.n > 50_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if mode == "wb" else f

    monkeypatch.setattr(atomic, "open", full_open, raising=False)
    with pytest.raises(OSError, match=r"disk full \(ENOSPC.*while writing model.safetensors") as e:
        llama4.save(models["B"], target)
    assert e.value.errno == errno.ENOSPC and "inline_container" not in str(e.value)
    monkeypatch.undo()
    assert which(target, models) == "A"
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == [".llama4-save.json"]


def test_manifest_lists_exactly_what_save_wrote(models, tmp_path):
    target = tmp_path / "c"
    llama4.save(models["A"], target, max_shard_size="60KB")
    man = json.loads((target / ".llama4-save.json").read_text())
    assert man["pending"] == [] and man["commit"] is None
    assert set(man["files"]) == {p.name for p in target.iterdir() if not p.name.startswith(".")}


def test_planted_manifest_cannot_reach_outside_the_directory(models, tmp_path):
    """A manifest planted in a shared directory: deleting or renaming through a symlinked subdirectory, or
    redirecting config.json to another file, is refused (save) or ignored (load)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    target = tmp_path / "c"
    llama4.save(models["A"], target)
    (target / "sub").symlink_to(outside)
    man = json.loads((target / ".llama4-save.json").read_text())
    for commit in ({"rename": [], "delete": ["sub/precious.txt"]},
                   {"rename": [[".model.safetensors.llama4-tmp-1", "sub/precious.txt"]], "delete": []},
                   {"rename": [["../outside/precious.txt", "config.json"]], "delete": []}):
        (target / ".llama4-save.json").write_text(json.dumps({**man, "commit": commit}))
        assert which(target, models) == "A"
        with pytest.raises(ValueError, match="damaged manifest"):
            llama4.save(models["B"], target)
        assert (outside / "precious.txt").read_text() == "keep me"
    # A stand-in must be the temporary of its own final name: not another file of the directory.
    (target / "notes.json").write_text("{}")
    (target / ".llama4-save.json").write_text(json.dumps({**man, "commit": {"rename": [["notes.json", "config.json"]],
                                                                            "delete": []}}))
    assert which(target, models) == "A"


def test_target_that_is_a_file_and_legacy_leftovers(models, tmp_path, caplog):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        llama4.save(models["A"], tmp_path / "f")
    assert (tmp_path / "f").read_text() == "a file"
    old = tmp_path / ".c.old-1234"  # what an older llama4 left when killed: it may hold user files
    old.mkdir()
    (old / "tokenizer.json").write_text("user's")
    with caplog.at_level(logging.WARNING, logger="llama4"):
        llama4.save(models["A"], tmp_path / "c")
    assert ".c.old-1234: left by a save of an older llama4" in caplog.text
    assert (old / "tokenizer.json").read_text() == "user's"

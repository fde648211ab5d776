"""Checkpoint files parsed strictly: malformed safetensors headers, indexes and expert_bias.json each give a
ValueError naming the file and the key; our safetensors writer matches the library byte for byte."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save as st_save

import llama4
from llama4.checkpoint.safetensors_io import read_header, write_safetensors
from conftest import small_text


def raw_file(path, header, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("header, data, message", [
    ([1, 2], b"", r"header is a JSON list; expected an object"),
    ({"a": [0, 8]}, bytes(8), r"tensor 'a': header entry is \[0, 8\]"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a': header entry has no dtype"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), r"tensor 'a': header entry has no data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), r"'a': data_offsets \[-8, 0\] must be"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), r"'a': data_offsets \[8, 0\] must be"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), r"tensor 'b'.*overlaps 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), r"'a'.*leaves 4 unused bytes"),
    (GOOD, bytes(16), r"4 bytes after the last tensor's data"),
    (GOOD, bytes(10), r"truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), r"'a'.*span 8 bytes but F32 \[3\] needs 12"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"'a': unknown dtype 'Q9'"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8), r"'a': shape \['2'\] is not"),
    ({"__metadata__": {"format": 1}, **GOOD}, bytes(12), r"'__metadata__' must be an object of strings"),
])
def test_malformed_header_is_a_clear_error(tmp_path, header, data, message):
    f = raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=rf"model.safetensors: .*{message}"):
        read_header(f)


def test_duplicate_header_key_is_refused(tmp_path):
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    f = tmp_path / "d.safetensors"
    f.write_bytes(len(h).to_bytes(8, "little") + h + bytes(8))
    with pytest.raises(ValueError, match=r"d.safetensors: .*key 'a' appears twice"):
        read_header(f)


def test_well_formed_header_passes_and_library_agrees(tmp_path):
    f = raw_file(tmp_path / "x.safetensors", GOOD, bytes(12))
    assert set(read_header(f)) == {"a", "b"}
    # Overlapping offsets: the safetensors library refuses the file too (we used to read header bytes as weights).
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    bad = raw_file(tmp_path / "y.safetensors", {"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [4, 8]}}, bytes(8))
    with pytest.raises(SafetensorError):
        load_file(str(bad))


def test_writer_matches_the_library_byte_for_byte():
    tensors = {"w": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16), "h": torch.randn(2).half(),
               "i": torch.arange(3), "s": torch.tensor(2.5), "e": torch.zeros(0, 4), "u": torch.ones(3, dtype=torch.uint8)}
    buf = io.BytesIO()
    write_safetensors(buf, tensors, {"format": "pt"})
    assert buf.getvalue() == st_save(tensors, metadata={"format": "pt"})


# Index -------------------------------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    model = llama4.Llama4(small_text(num_hidden_layers=2)).init_weights(std=0.05, seed=0)
    return llama4.save(model, tmp_path / "c", max_shard_size="60KB")


def edit_index(path, edit):
    f = path / "model.safetensors.index.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(weight_map=list(d["weight_map"])), r"'weight_map' must be an object.*got list"),
    (lambda d: d["weight_map"].update({"model.norm.weight": 3}), r"weight_map\['model.norm.weight'\] = 3; expected"),
    (lambda d: d["weight_map"].update({"model.norm.weight": "../x.safetensors"}), r"'\.\./x.safetensors' points outside"),
    (lambda d: d["weight_map"].update({"model.norm.weight": "/etc/x.safetensors"}), r"'/etc/x.safetensors' points outside"),
    (lambda d: d.update(metadata=[1]), r"'metadata' must be an object"),
])
def test_malformed_index_is_a_clear_error(sharded, edit, message):
    edit_index(sharded, edit)
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json: .*{message}"):
        llama4.load(sharded)


def test_index_may_not_read_weights_from_outside(sharded, tmp_path):
    """A shard outside the checkpoint, even a valid one, is never read."""
    outside = tmp_path / "elsewhere.safetensors"
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    outside.write_bytes(first.read_bytes())
    edit_index(sharded, lambda d: d["weight_map"].update(
        {k: "../elsewhere.safetensors" for k, v in d["weight_map"].items() if v == first.name}))
    with pytest.raises(ValueError, match="points outside the checkpoint directory"):
        llama4.load(sharded)


def test_stray_shards_beside_an_index_or_model_file_are_ignored(sharded, tmp_path):
    (sharded / "model-00009-of-00009.safetensors").write_bytes(b"junk left by someone")
    llama4.load(sharded)
    model = llama4.Llama4(small_text(num_hidden_layers=2)).init_weights(std=0.05, seed=0)
    single = llama4.save(model, tmp_path / "s")
    (single / "model-00001-of-00002.safetensors").write_bytes(b"junk")
    llama4.load(single)


# expert_bias.json ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", r"not a readable expert-bias file"),
    ("[1, 2]", r"expected an object.*got a JSON list"),
    ('{"layers.1.feed_forward.expert_bias": "0.5"}', r"'layers.1.feed_forward.expert_bias' must be a list of finite"),
    ('{"layers.1.feed_forward.expert_bias": [0.5, null, 0, 0]}', r"must be a list of finite numbers"),
    ('{"layers.1.feed_forward.expert_bias": [NaN, 0, 0, 0]}', r"must be a list of finite numbers"),
    ('{"layers.x.bias": [0, 0, 0, 0]}', r"key 'layers.x.bias' is not of the form"),
    ('{"layers.99.feed_forward.expert_bias": [0, 0, 0, 0]}', r"'layers.99.feed_forward.expert_bias' does not name"),
    ('{"layers.1.feed_forward.expert_bias": [0, 0]}', r"does not name an MoE layer's 4 expert biases \(got 2"),
])
def test_malformed_expert_bias_names_the_file(sharded, content, message):
    (sharded / "expert_bias.json").write_text(content)
    with pytest.raises(ValueError, match=rf"expert_bias.json: .*{message}|expert_bias.json: {message}"):
        llama4.load(sharded)

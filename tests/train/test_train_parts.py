"""Training building blocks: config schema, data reading / packing / loss masks, packed attention,
chunked cross-entropy, expert balancing pieces, LoRA. Small and fast; the loop is in test_train.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import llama4
from llama4.train.config import config_from_dict, load_train_config
from llama4.train.data import Encoder, PackedData, read_documents
from llama4.train.loss import chunked_cross_entropy

CORPUS_FILES = ("text/chat.py", "config.py", "media/image.py")  # real English-and-code text from this package


def corpus_text() -> str:
    from pathlib import Path

    root = Path(llama4.__file__).parent
    return "".join((root / name).read_text() for name in CORPUS_FILES)


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A small BPE (300 ordinary ids + the Llama 4 specials) trained on the corpus."""
    from llama4.text.bpe import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(corpus_text())
    return llama4.Tokenizer(train_tokenizer([d / "corpus.txt"], 300, d / "tok"))


def tiny_text_config(layers: int = 2, vocab: int = 2348) -> llama4.Llama4Config:
    cfg = llama4.preset("tiny").replace(num_hidden_layers=layers, vocab_size=vocab)
    cfg.vision = None
    return cfg


# Config -------------------------------------------------------------------------------------------

def test_config_defaults_overrides_and_relative_paths(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[data]\npaths = ["a.jsonl"]\nseq_len = 128\n[optim]\nlr = 1e-3\n')
    cfg = load_train_config(f, ["optim.lr=2e-3", "train.out_dir=runs/x", "lora.targets=[\"attention\"]"])
    assert cfg.optim.lr == 2e-3 and cfg.data.seq_len == 128 and cfg.train.out_dir == "runs/x"
    assert cfg.data.paths == [str(tmp_path / "a.jsonl")]
    assert cfg.lora.targets == ["attention"] and cfg.train.steps == 1000


@pytest.mark.parametrize("text, match", [
    ("[optim]\nlearning_rate = 1e-3\n", r"unknown key\(s\) \['optim.learning_rate'\]"),
    ("[optimizer]\nlr = 1e-3\n", r"unknown section\(s\) \['optimizer'\]"),
    ("[train]\nsteps = \"ten\"\n", r"train.steps = 'ten' has the wrong type"),
    ("[train]\ngrad_accum = 0\n", r"train.grad_accum must be >= 1"),
    ("[lora]\ntargets = [\"mlp\"]\n", r"lora.targets"),
    ("[optim\nlr = 1\n", r"not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_train_config(f)


def test_override_syntax_error():
    with pytest.raises(ValueError, match="expected section.key=value"):
        load_train_config(None, ["lr=1e-3"])


# Data ---------------------------------------------------------------------------------------------

def _encoder(tok, vision=True, **data):
    cfg = llama4.preset("tiny")
    if not vision:
        cfg.vision = None
    return Encoder(tok, cfg, config_from_dict({"data": data}).data)


def test_chat_loss_only_on_assistant_tokens(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "hi"}]
    f.write_text(json.dumps({"messages": msgs, "task": "meta"}) + "\n")
    (doc,) = read_documents([str(f)], _encoder(tok))
    assert doc.ids.tolist() == tok.encode_chat(msgs, add_generation_prompt=False)
    learned = [int(i) for i in doc.ids[doc.target]]
    assert learned == tok.encode("hi there") + [tok.eot_id] + tok.encode("hi") + [tok.eot_id]


def test_text_and_txt_documents(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n\n{"text": "bye"}\n')
    (tmp_path / "b.txt").write_text("plain file text")
    docs = read_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], _encoder(tok))
    assert [d.ids.tolist() for d in docs] == [tok.encode(t, bos=True, eos=True)
                                              for t in ("hello world", "bye", "plain file text")]
    assert all(d.target.all() for d in docs)


@pytest.mark.parametrize("line, err, match", [
    ('{"messages": [{"role": "user", "content": "x"}', ValueError, r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', ValueError, r"d.jsonl:2: expected an object with either 'messages'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}}]}, '
     '{"role": "assistant", "content": "a"}]}', FileNotFoundError, r"d.jsonl:2: media file 'nope.png' not found"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ValueError, r"d.jsonl:2: messages\[0\]: unknown role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', ValueError, r"d.jsonl:2: no assistant message"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, line, err, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(err, match=match):
        read_documents([str(f)], _encoder(tok))


def test_media_needs_a_vision_model(tok, tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "i.png")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "i.png"}}]},
        {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:1: .*no vision encoder"):
        read_documents([str(f)], _encoder(tok, vision=False))


def test_image_tiles_follow_inference_preprocessing(tok, tmp_path):
    Image.new("RGB", (120, 60), (200, 10, 10)).save(tmp_path / "wide.png")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "wide.png"}},
                                     {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "red"}]}) + "\n")
    enc = _encoder(tok, seq_len=512, batch_size=1, max_tiles=4)
    docs = read_documents([str(f)], enc)
    batch = PackedData(docs, enc, enc.cfg, 0, tok.pad_id).next_batch()
    tiles, grid = llama4.preprocess_image(tmp_path / "wide.png", tile_size=56, max_tiles=4)
    assert grid == (1, 2) and torch.equal(batch.pixel_values, tiles)
    n_slots = int((batch.input_ids == tok.special_tokens["<|patch|>"]).sum())
    assert n_slots == tiles.shape[0] * llama4.preset("tiny").vision.tokens_per_tile


def test_packing_labels_positions_and_resume_state(tok, tmp_path):
    texts = [" ".join(["word"] * n) for n in (5, 30, 3, 12)]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    enc = _encoder(tok, seq_len=16, batch_size=2, shuffle=True)
    docs = read_documents([str(f)], enc)
    data = PackedData(docs, enc, enc.cfg, seed=3, pad_id=tok.pad_id)
    stream = np.concatenate([docs[i].ids for i in _order(data)])
    batches = [data.next_batch() for _ in range(3)]
    seen = []
    for b in batches:
        assert b.input_ids.shape == (2, 16)
        pos_BT = b.doc_pos if b.doc_pos is not None else torch.arange(16).expand(2, 16)
        for ids, labels, pos in zip(b.input_ids.tolist(), b.labels.tolist(), pos_BT.tolist()):
            for t in range(15):
                if pos[t + 1] == pos[t] + 1 and ids[t + 1] != tok.pad_id:  # within a document
                    assert labels[t] == ids[t + 1]
            seen += ids
    # The epoch's tokens appear once each, in order; text continues across rows.
    real = [i for i in seen if i != tok.pad_id]
    n = min(len(real), len(stream))
    assert n > 60 and real[:n] == stream[:n].tolist()
    # The stream restarts identically from a saved state.
    again = PackedData(docs, enc, enc.cfg, seed=3, pad_id=tok.pad_id)
    again.state = {"epoch": 0, "row": 2}
    assert torch.equal(again.next_batch().input_ids, batches[1].input_ids)


def _order(data):
    return [p.doc for row in data.rows(0) for p in row if p.start == 0]


def test_long_chat_sample_is_an_error(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "x " * 40},
                                          {"role": "assistant", "content": "y"}]}) + "\n")
    enc = _encoder(tok, seq_len=16)
    with pytest.raises(ValueError, match=r"d.jsonl:1: sample has \d+ tokens .*data.seq_len=16"):
        PackedData(read_documents([str(f)], enc), enc, enc.cfg, 0, tok.pad_id)


# Packed attention ---------------------------------------------------------------------------------

def test_packed_rows_equal_documents_run_alone():
    cfg = llama4.preset("tiny").replace(vocab_size=300, attention_chunk_size=8, floor_scale=4)
    cfg.vision = None
    model = llama4.Llama4(cfg).init_weights(std=0.08, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    lens = [11, 20, 5]
    docs = [torch.randint(0, 300, (n,), generator=g) for n in lens]
    row = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = model(row, doc_pos=pos)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        # Without doc_pos the same row attends across documents: the logits differ.
        assert not torch.allclose(model(row)[0][lens[0]:], alone[lens[0]:], atol=1e-3)


# Chunked cross-entropy ----------------------------------------------------------------------------

def test_chunked_cross_entropy_matches_full_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    loss = chunked_cross_entropy(h, lambda h_CD: F.linear(h_CD, w), y, chunk=8, norm=40.0)
    (loss * 3).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum") / 40.0
    (ref * 3).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_chunked_cross_entropy_bf16_autocast_and_frozen_weight():
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(20, 8)
    y = torch.randint(0, 20, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h, lambda h_CD: F.linear(h_CD, w), y, chunk=4)
    loss.backward()
    ref = F.cross_entropy(h @ w.t(), y)
    assert abs(loss.item() - ref.item()) < 0.05 and h.grad is not None and loss.dtype == torch.float32


# Balancing and LoRA pieces ------------------------------------------------------------------------

def test_bias_moves_towards_balance_and_only_changes_choice():
    from llama4.train.balance import ExpertBalancer

    model = llama4.Llama4(tiny_text_config(layers=2)).init_weights(std=0.05, seed=0)
    bal = ExpertBalancer(model, bias_update_rate=0.1, aux_loss_coef=0.01)
    moe = bal.moes[0]
    bal.begin()
    x = torch.randn(1, 64, 128)
    moe(x)
    aux = bal.collect()
    assert aux is not None and aux.requires_grad
    counts = bal.counts_LE[0].clone()
    bal.step()
    expected = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(moe.expert_bias, expected.float())
    # Scores come from the unbiased logits: the chosen experts' sigmoid scores.
    idx, scores, logits = moe.route(x[0])
    torch.testing.assert_close(scores, torch.sigmoid(logits.gather(1, idx)))


def test_lora_starts_at_base_trains_adapters_only_and_merges(tmp_path):
    from llama4.train.lora import add_lora, merge_adapter, save_adapter

    model = llama4.Llama4(tiny_text_config(layers=2)).init_weights(std=0.05, seed=0)
    base = llama4.save(model, tmp_path / "base")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(ids)
    params = add_lora(model, rank=4, alpha=8.0, targets=["attention", "experts"])
    assert {p.requires_grad for p in model.parameters()} == {False, True}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref)
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
        tuned = model(ids)
    assert not torch.allclose(tuned, ref, atol=1e-4)
    adapter = save_adapter(model, tmp_path / "adapter")
    merged = llama4.load(merge_adapter(base, adapter, tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), tuned, rtol=1e-4, atol=1e-4)


def test_chunked_cross_entropy_never_holds_full_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    N, D, V = 256, 16, 202_048  # the real vocabulary
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (N,))
    with Largest():
        chunked_cross_entropy(h, lambda h_CD: F.linear(h_CD, w), y, chunk=32).backward()
    assert Largest.biggest <= max(32 * V, V * D) < N * V


def test_load_applies_expert_biases_and_rejects_bad_ones(tmp_path):
    model = llama4.Llama4(tiny_text_config(layers=2)).init_weights(std=0.05, seed=0)
    path = llama4.save(model, tmp_path / "m")
    (path / "expert_bias.json").write_text(json.dumps({"layers.1.feed_forward.expert_bias": [0.5, 0, 0, -0.5]}))
    assert llama4.load(path).layers[1].feed_forward.expert_bias.tolist() == [0.5, 0, 0, -0.5]
    (path / "expert_bias.json").write_text(json.dumps({"layers.0.feed_forward.expert_bias": [0.5, 0, 0, -0.5]}))
    with pytest.raises(ValueError, match=r"expert_bias.json: 'layers.0.feed_forward.expert_bias' does not name"):
        llama4.load(path)


def test_without_packing_each_row_is_one_document(tok, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"text": " ".join(["word"] * n)}) + "\n" for n in (1, 9, 2)))
    enc = _encoder(tok, seq_len=16, shuffle=False, pack=False)
    docs = read_documents([str(f)], enc)
    n_rows = sum(-(-len(d.ids) // 16) for d in docs)  # a document longer than a row takes several
    assert n_rows > len(docs)
    enc.cfg.batch_size = n_rows
    batch = PackedData(docs, enc, enc.cfg, 0, tok.pad_id).next_batch()
    assert batch.doc_pos is None  # plain causal attention
    rows = [[i for i in row if i != tok.pad_id] for row in batch.input_ids.tolist()]
    assert [row[0] == tok.bos_id for row in rows].count(True) == len(docs)  # each document starts a row
    assert sum(rows, []) == np.concatenate([d.ids for d in docs]).tolist()


def test_vision_overrides_build_the_tower(tok):
    from llama4.train.loop import build_model

    cfg = config_from_dict({"model": {"vision_overrides": {"hidden_size": 128, "intermediate_size": 512,
                                                            "num_hidden_layers": 3}}})
    model = build_model(cfg, tok, torch.device("cpu"))
    assert model.config.vision.hidden_size == 128 and len(model.vision.layers) == 3
    for bad, message in [({"bogus": 1}, "bogus"), ({"hidden_size": 100}, "vision config")]:
        with pytest.raises(ValueError, match=message):
            build_model(config_from_dict({"model": {"vision_overrides": bad}}), tok, torch.device("cpu"))

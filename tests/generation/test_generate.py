"""Generation: greedy equals the uncached argmax and transformers' generate; sampling, stops, ragged
batches, streaming, bounded prefill memory and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import llama4
from conftest import LargestTensor, hf_model, save_hf, small_text
from llama4.generation import SamplingParams, generate_batch, sample
from llama4.generation.sampling import filter_logits

C = 32  # small_text's attention_chunk_size


pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text()).init_weights(std=0.08, seed=0).eval()


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len,prefill_chunk", [(3 * C + 5, 24), (4 * C, C), (2 * C + 1, 2048)])
def test_greedy_equals_uncached_argmax(model, prompt_len, prefill_chunk):
    prompt = _prompt(prompt_len)
    out = llama4.generate(model, prompt, max_new_tokens=45, stop_ids=[], prefill_chunk=prefill_chunk)
    assert out == _uncached_greedy(model, prompt, 45)


SCOUT_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
              "original_max_position_embeddings": 64}


@pytest.mark.parametrize("overrides", [
    {},  # QK-norm, temperature tuning every 8 positions, all layers MoE
    dict(use_qk_norm=False, interleave_moe_layer_step=2, rope_scaling=SCOUT_ROPE, no_rope_layer_interval=2),
], ids=["scout_like", "maverick_like_scaled"])
def test_greedy_equals_transformers_generate(tmp_path, overrides):
    cfg = small_text(**overrides)
    hf = hf_model(cfg, seed=1)
    model = llama4.load(save_hf(hf, tmp_path / "ckpt"))
    prompt = torch.randint(3, 512, (1, 3 * C + 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.generate(prompt, do_sample=False, max_new_tokens=48, min_new_tokens=48, eos_token_id=None,
                          pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert llama4.generate(model, prompt[0], max_new_tokens=48, stop_ids=[], prefill_chunk=40) == ref


def test_stream_yields_the_same_tokens(model):
    prompt = _prompt(50, 1)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, stop_ids=[])
    stream = llama4.generate_stream(model, prompt, **kw)
    first = next(stream)
    assert [first, *stream] == llama4.generate(model, prompt, **kw)


def test_ragged_batch_equals_each_prompt_alone(model):
    prompts = [_prompt(n, n) for n in (C - 1, 3 * C + 2, 5, 2 * C)]
    alone = [llama4.generate(model, p, max_new_tokens=20, stop_ids=[]) for p in prompts]
    # Stop rows 0 and 2 early: the remaining rows must go on unchanged after the batch shrinks.
    stop = {alone[0][4], alone[2][9]} - set(alone[1]) - set(alone[3])
    expect = [a[:next((i + 1 for i, t in enumerate(a) if t in stop), len(a))] for a in alone]
    assert generate_batch(model, prompts, max_new_tokens=20, stop_ids=sorted(stop)) == expect
    assert [len(e) for e in expect] == [5, 20, 10, 20]  # rows 0 and 2 stop early, the others run on
    # Equal lengths go through one batched prefill.
    same = [_prompt(40, s) for s in range(3)]
    assert generate_batch(model, same, max_new_tokens=8, stop_ids=[]) == \
        [llama4.generate(model, p, max_new_tokens=8, stop_ids=[]) for p in same]


def test_seed_reproducible(model):
    prompt = _prompt(30, 2)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=40, stop_ids=[])
    a = llama4.generate(model, prompt, seed=1, **kw)
    assert a == llama4.generate(model, prompt, seed=1, **kw)
    assert a != llama4.generate(model, prompt, seed=2, **kw)
    assert llama4.generate(model, prompt, max_new_tokens=10, temperature=1.3, top_k=1, seed=3, stop_ids=[]) == \
        llama4.generate(model, prompt, max_new_tokens=10, stop_ids=[])


def test_stops_on_config_eos_and_given_ids(model):
    prompt = _prompt(40, 3)
    greedy = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[])
    k = next(i for i in range(3, 20) if greedy[i] not in greedy[:i])
    eos_model = llama4.Llama4(small_text(eos_token_id=[500, greedy[k]]))
    eos_model.load_state_dict(model.state_dict())
    assert llama4.generate(eos_model.eval(), prompt, max_new_tokens=20) == greedy[:k + 1]
    assert llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[greedy[k]]) == greedy[:k + 1]
    assert llama4.generate(model, prompt, max_new_tokens=7, stop_ids=[]) == greedy[:7]
    assert llama4.generate(model, prompt, max_new_tokens=0) == []


class _LetterTokenizer:
    """Token i decodes to one letter: enough to test stop strings without a real vocabulary."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings(model):
    prompt = _prompt(40, 4)
    greedy = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[])
    text = _LetterTokenizer().decode(greedy)
    target = text[6:8]
    end = text.index(target) + len(target)
    out = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[], stop_strings=[target],
                          tokenizer=_LetterTokenizer())
    assert out == greedy[:end]
    with pytest.raises(ValueError, match="tokenizer"):
        llama4.generate(model, prompt, max_new_tokens=2, stop_strings=["x"])


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.2) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    seen = torch.tensor([[True, False, False, True]])
    raw = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    assert sample(raw, SamplingParams(repetition_penalty=2.0), seen_BV=seen).item() == 1  # 2.0 -> 1.0 < 1.9


def test_repetition_penalty_changes_greedy_output(model):
    prompt = _prompt(30, 6)
    plain = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[])
    penalised = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[], repetition_penalty=5.0)
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[1, 512]), r"512.*vocabulary \[0, 512\)"),
    (dict(prompt_ids=[1, -1]), "outside the model's vocabulary"),
    (dict(max_new_tokens=4090), "max_position_embeddings"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=1.5), "seed"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(stop_ids=[1.5]), "stop_ids"),
])
def test_bad_input_is_a_clear_error(model, kwargs, match):
    args = dict(prompt_ids=[1, 2, 3, 4, 5, 6, 7], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        llama4.generate(model, args.pop("prompt_ids"), **args)
    with pytest.raises(ValueError, match=match):  # the streaming form fails before it yields
        llama4.generate_stream(model, [1, 2, 3, 4, 5, 6, 7] if "prompt_ids" not in kwargs else kwargs["prompt_ids"],
                               **{"max_new_tokens": 4, **{k: v for k, v in kwargs.items() if k != "prompt_ids"}})


def test_chunked_prefill_bounds_activations():
    """A 2048-token prompt in 64-token slices: nothing T x T, nothing T x vocabulary; the largest
    tensor is the global layers' KV buffer (T x K x Dh), which the prompt needs anyway."""
    T, V = 2048, 4096
    cfg = small_text(vocab_size=V, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     intermediate_size=32, intermediate_size_mlp=32, attention_chunk_size=64)
    model = llama4.Llama4(cfg).init_weights(seed=0).eval()
    prompt = torch.randint(0, V, (T,)).tolist()
    with LargestTensor() as spy:
        llama4.generate(model, prompt, max_new_tokens=2, stop_ids=[], prefill_chunk=64)
    kv_global = (T + 2) * cfg.text.num_key_value_heads * cfg.text.head_dim
    assert spy.largest <= max(kv_global, V * cfg.text.hidden_size) < T * T / 4


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny checkpoint directory with its own small tokenizer.json (special tokens included)."""
    from llama4.text.bpe import train_tokenizer

    root = tmp_path_factory.mktemp("text_ckpt")
    corpus = root / "corpus.txt"
    words = ["hello", "world", "llama", "the", "cat", "sat", "on", "mat"]
    corpus.write_text(" ".join(words[(i * 7) % 8] for i in range(3000)))
    train_tokenizer([corpus], 300, root)
    tok = llama4.Tokenizer(root)
    cfg = small_text(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids,
                     pad_token_id=tok.pad_id)
    llama4.save(llama4.Llama4(cfg).init_weights(std=0.08, seed=0), root)
    return root, tok


def test_cli_generate_streams_the_decoded_tokens(text_ckpt, capsys):
    from llama4.cli import main

    root, tok = text_ckpt
    model = llama4.load(root)
    for chat, ids in [(False, tok.encode("the cat sat", bos=True)),
                      (True, tok.encode_chat([{"role": "user", "content": "the cat sat"}]))]:
        new = llama4.generate(model, ids, max_new_tokens=12, temperature=0.7, seed=4)
        expect = tok.decode([t for t in new if t not in tok.stop_ids])
        argv = ["generate", "--model", str(root), "--prompt", "the cat sat", "--max-new-tokens", "12",
                "--temperature", "0.7", "--seed", "4"] + (["--chat"] if chat else [])
        assert main(argv) == 0
        assert capsys.readouterr().out == expect + "\n"
    assert main(["generate", "--model", str(root / "nope"), "--prompt", "x"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(root), "--prompt", "x", "--top-p", "nan"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation(text_ckpt, capsys, monkeypatch):
    import io

    from llama4.cli import main

    root, tok = text_ckpt
    model = llama4.load(root)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\nthe mat\n/exit\n"))
    assert main(["chat", "--model", str(root), "--max-new-tokens", "6"]) == 0
    replies = capsys.readouterr().out.split("\n")[:2]
    # The second turn's prompt holds the first exchange: replay it through the engine.
    messages = []
    for user, reply in zip(["hello world", "the mat"], replies):
        messages.append({"role": "user", "content": user})
        new = llama4.generate(model, tok.encode_chat(messages), max_new_tokens=6)
        assert reply == tok.decode([t for t in new if t not in tok.stop_ids])
        messages.append({"role": "assistant", "content": reply})


@pytest.fixture(scope="module")
def mm_ckpt(text_ckpt, tmp_path_factory):
    """A tiny multimodal checkpoint (the tiny preset's vision tower) sharing text_ckpt's tokenizer."""
    import shutil

    from PIL import Image

    src, tok = text_ckpt
    root = tmp_path_factory.mktemp("mm_ckpt")
    shutil.copy(src / "tokenizer.json", root / "tokenizer.json")
    cfg = llama4.preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2, attention_chunk_size=32,
                                        bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    cfg.image_token_index = tok.special_tokens["<|patch|>"]
    cfg.boi_token_index, cfg.eoi_token_index = tok.special_tokens["<|image_start|>"], tok.special_tokens["<|image_end|>"]
    llama4.save(llama4.Llama4(cfg).init_weights(std=0.08, seed=1), root)
    Image.linear_gradient("L").convert("RGB").resize((112, 50)).save(root / "wide.png")
    return root, tok


def test_image_prompt_equals_uncached_argmax(mm_ckpt, capsys):
    """Image features land in the right slots even when the prefill slices cut through them."""
    from llama4.cli import main
    from llama4.media.prompt import encode_prompt, user_message

    root, tok = mm_ckpt
    model = llama4.load(root)
    prompt = encode_prompt(tok, [user_message("the cat", [str(root / "wide.png")])], model.config)
    assert prompt.pixel_values is not None and len(prompt.ids) > C
    new = llama4.generate(model, prompt.ids, max_new_tokens=10, stop_ids=[], prefill_chunk=5,
                          pixel_values=prompt.pixel_values)
    ids = list(prompt.ids)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]), pixel_values=prompt.pixel_values)[0, -1].argmax()))
    assert new == ids[len(prompt.ids):]
    assert main(["generate", "--model", str(root), "--prompt", "the cat", "--image", str(root / "wide.png"),
                 "--max-new-tokens", "10"]) == 0
    greedy = llama4.generate(model, prompt.ids, max_new_tokens=10, pixel_values=prompt.pixel_values)
    assert capsys.readouterr().out == tok.decode([t for t in greedy if t not in tok.stop_ids]) + "\n"
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate_batch(model, [prompt.ids, prompt.ids], max_new_tokens=2, pixel_values=prompt.pixel_values)


def test_chat_session_reuses_the_cached_prefix(model):
    """Each turn equals a fresh generate; only the part not already cached is prefilled; a prompt that
    diverges inside a chunk the local layers still hold (their spare slots) reuses everything before
    it, and one that diverges in a chunk they no longer hold resumes at that chunk's start."""
    from llama4.generation import ChatSession

    session = ChatSession(model, 400)
    kw = dict(max_new_tokens=10, stop_ids=[])
    turn1 = _prompt(40, 11)
    out1 = session.generate(turn1, **kw)
    assert out1 == llama4.generate(model, turn1, **kw) and session.reused == 0
    turn2 = turn1 + out1 + _prompt(130, 12)  # the whole history, then new tokens
    out2 = session.generate(turn2, **kw)
    assert out2 == llama4.generate(model, turn2, **kw)
    assert session.reused == len(turn1) + len(out1) - 1  # the last sampled token was never fed
    assert session.ids == turn2 + out2[:-1]
    turn3 = turn2[:50] + _prompt(15, 13)  # diverges at 50: chunk [32, 64) is long gone from the local layers
    out3 = session.generate(turn3, **kw)
    assert out3 == llama4.generate(model, turn3, **kw) and session.reused == 32
    turn4 = turn3[:60] + _prompt(5, 15)  # diverges at 60, which the store still holds
    out4 = session.generate(turn4, **kw)
    assert out4 == llama4.generate(model, turn4, **kw) and session.reused == 60
    stream = session.generate_stream(turn3 + out3, **kw)
    assert next(stream) == llama4.generate(model, turn3 + out3, **kw)[0]
    with pytest.raises(ValueError, match="max_context"):
        session.generate(_prompt(395, 14), **kw)


def test_cli_chat_with_images(mm_ckpt, capsys, monkeypatch):
    """`llama4 chat --image` attaches the image to the first turn; `/image PATH` to the next; a missing
    file is refused when typed (nothing attached) and the conversation goes on."""
    import io

    from llama4.cli import main
    from llama4.media.prompt import encode_prompt, user_message

    root, tok = mm_ckpt
    image = str(root / "wide.png")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the cat\n/image {root / 'missing.png'}\nsat\n/image {image}\n"
                                                 "the mat\n/exit\n"))
    assert main(["chat", "--model", str(root), "--max-new-tokens", "5", "--image", image]) == 0
    captured = capsys.readouterr()
    assert "missing.png" in captured.err and "nothing attached" in captured.err
    replies = captured.out.split("\n")[:3]
    model = llama4.load(root)
    history = [user_message("the cat", [image])]
    # "sat" goes out as plain text (the missing image was never attached); "the mat" carries the second image.
    for reply, nxt in zip(replies, [{"role": "user", "content": "sat"}, user_message("the mat", [image]), None]):
        prompt = encode_prompt(tok, history, model.config)
        new = llama4.generate(model, prompt.ids, max_new_tokens=5, pixel_values=prompt.pixel_values)
        assert reply == tok.decode([t for t in new if t not in tok.stop_ids])
        history += [{"role": "assistant", "content": reply}] + ([nxt] if nxt else [])
    assert encode_prompt(tok, history[:-1], model.config).pixel_values.shape[0] == 6  # 2 images x (2 tiles + thumb)


def test_cli_generate_and_chat_with_int8_kv(text_ckpt, capsys, monkeypatch):
    import io

    from llama4.cli import main

    root, tok = text_ckpt
    model = llama4.load(root)
    ids = tok.encode("the cat sat", bos=True)
    new = llama4.generate(model, ids, max_new_tokens=12, kv_dtype="int8")
    assert main(["generate", "--model", str(root), "--prompt", "the cat sat", "--max-new-tokens", "12",
                 "--kv-dtype", "int8"]) == 0
    assert capsys.readouterr().out == tok.decode([t for t in new if t not in tok.stop_ids]) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n/exit\n"))
    assert main(["chat", "--model", str(root), "--max-new-tokens", "6", "--kv-dtype", "fp8"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root), "--prompt", "x", "--kv-dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err

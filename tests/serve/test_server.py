"""`llama4 serve` end to end: a real uvicorn server on 127.0.0.1 and the real `openai` client.

The model is the default model's architecture (text + vision, chunked and global layers) with random
weights, so greedy answers run to max_tokens and differ between prompts; every answer is checked
token for token against `llama4.generate` on the same ids.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
import torch

import llama4
from conftest import LiveServer
from llama4.media.prompt import encode_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = llama4.__file__.rsplit("/", 1)[0] + "/assets/default_model"


@pytest.fixture(scope="module")
def tok():
    return llama4.Tokenizer(ASSET + "/tokenizer.json")


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(llama4.load_config(ASSET)).init_weights(std=0.08, seed=0).eval()


@pytest.fixture(scope="module")
def stops(model, tok):
    return sorted(set(model.config.text.eos_token_id) | set(tok.stop_ids))


@pytest.fixture(scope="module")
def server(model, tok):
    with LiveServer(model, tok) as s:
        yield s


def _ref_text(tok, ids, stops):
    return tok.decode([t for t in ids if t not in stops])


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what is the colour of shape number {i * 7}?"}]


def test_chat_greedy_equals_generate_and_stream_equals_nonstream(server, model, tok, stops):
    client = server.client()
    msgs = _chat(1)
    ids = tok.encode_chat(msgs)
    ref = llama4.generate(model, ids, max_new_tokens=24, stop_ids=stops)
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24, logprobs=True,
                                       top_logprobs=2)
    got = [bytes(e.bytes) for e in r.choices[0].logprobs.content]
    assert got == [tok.decode_bytes([t]) for t in ref if t not in stops]  # token for token
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in r.choices[0].logprobs.content)
    assert r.choices[0].message.content == _ref_text(tok, ref, stops)
    assert r.choices[0].finish_reason == ("stop" if ref[-1] in stops else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_completions_strings_ids_echo_logprobs(server, model, tok, stops):
    client = server.client()
    ids = tok.encode("The shape is", bos=True)
    ref = llama4.generate(model, ids, max_new_tokens=12, stop_ids=stops)
    r = client.completions.create(model="tiny", prompt="The shape is", max_tokens=12, temperature=0)
    assert r.choices[0].text == _ref_text(tok, ref, stops)
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, echo=True, logprobs=1)
    lp = r2.choices[0].logprobs
    assert r2.choices[0].text == tok.decode(ids) + r.choices[0].text
    assert len(lp.tokens) == len(ids) + len([t for t in ref if t not in stops]) and lp.token_logprobs[0] is None
    with torch.no_grad():  # the echoed prompt's logprobs are the model's
        want = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want.tolist(), abs=1e-4)
    two = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == _ref_text(tok, ref[:5], stops)
    # Token for token: the completion's logprob tokens are generate's tokens.
    r3 = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=0)
    assert r3.choices[0].logprobs.tokens == [tok.decode([t]) for t in ref if t not in stops]
    assert (r3.usage.prompt_tokens, r3.usage.completion_tokens) == (len(ids), len(ref))
    # Streaming completions give the same text, and the usage at the end.
    chunks = list(client.completions.create(model="tiny", prompt="The shape is", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(ref)


def test_streamed_n_choices_equal_unstreamed(server):
    """n=2 streamed: both choices' tokens share the engine's steps (and often one SSE write); each
    choice's text equals the unstreamed answer's and ends with exactly one finish_reason."""
    client = server.client()
    kw = dict(model="tiny", messages=_chat(6), temperature=1.0, max_tokens=20, seed=11, n=2)
    whole = client.chat.completions.create(**kw)
    texts, reasons = ["", ""], [[], []]
    for c in client.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason is not None:
                reasons[ch.index].append(ch.finish_reason)
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [[c.finish_reason] for c in whole.choices]


def test_sixteen_concurrent_streams_get_their_own_outputs(server, model, tok, stops):
    n = 16
    lengths = [4 + 2 * i for i in range(n)]  # clients leave at different times...
    # llama4.generate_batch equals llama4.generate row for row (tests/generation); one call is quicker.
    full = llama4.generate_batch(model, [tok.encode_chat(_chat(i)) for i in range(n)], max_new_tokens=max(lengths),
                                 stop_ids=stops)
    refs = [_ref_text(tok, full[i][:lengths[i]], stops) for i in range(n)]
    got, errors = [None] * n, []

    def run(i):
        try:
            time.sleep(0.02 * i)  # ...and join while others are running
            client = server.client()
            stream = client.chat.completions.create(model="tiny", messages=_chat(i), temperature=0,
                                                    max_tokens=lengths[i], stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # reported below with the client's number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert got == refs


def test_disconnect_cancels_and_frees_blocks(server):
    engine = server.engine
    body = {"model": "tiny", "messages": _chat(3), "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.scheduler.running
    deadline = time.monotonic() + 10
    while (engine.scheduler.running or engine.scheduler.kv.used_blocks()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.scheduler.running and engine.scheduler.kv.used_blocks() == 0


def test_openai_client_closing_a_stream_frees_blocks(server):
    engine = server.engine
    stream = server.client().chat.completions.create(model="tiny", messages=_chat(4), max_tokens=2000,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(5):
        next(it)
    assert engine.scheduler.running
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while (engine.scheduler.running or engine.scheduler.kv.used_blocks()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.scheduler.running and engine.scheduler.kv.used_blocks() == 0
    assert engine.in_flight == 0


def test_shared_system_prompt_hits_prefix_cache(server, model, tok, stops):
    system = {"role": "system", "content": "You answer questions about coloured shapes. " * 12}
    client = server.client()
    before = server.engine.scheduler.kv.prefix_hits
    for i in (1, 2):
        msgs = [system, *_chat(i)]
        r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=6)
        ref = llama4.generate(model, tok.encode_chat(msgs), max_new_tokens=6, stop_ids=stops)
        assert r.choices[0].message.content == _ref_text(tok, ref, stops)
    system_len = len(tok.encode_chat([system], add_generation_prompt=False))
    assert server.engine.scheduler.kv.prefix_hits - before >= system_len // 16 * 16 - 16
    metrics = httpx.get(server.url + "/metrics").text
    rate = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("llama4_prefix_cache_hit_rate")))
    assert rate > 0
    for name in ("llama4_requests_running", "llama4_requests_waiting", "llama4_kv_blocks_used",
                 "llama4_generation_tokens_per_second", "llama4_time_to_first_token_seconds_count",
                 "llama4_time_per_output_token_seconds_count"):
        assert name in metrics


def test_preemption_under_tiny_pool_keeps_outputs(model, tok, stops):
    # 8 KiB blocks: 24 of them hold about two of these requests at once.
    with LiveServer(model, tok, kv_memory=24 * 8192, prefill_chunk=32) as s:
        n = 6
        full = llama4.generate_batch(model, [tok.encode_chat(_chat(i)) for i in range(n)], max_new_tokens=30,
                                     stop_ids=stops)
        refs = [_ref_text(tok, f, stops) for f in full]
        got = [None] * n

        def run(i):
            r = s.client().chat.completions.create(model="tiny", messages=_chat(i), temperature=0, max_tokens=30)
            got[i] = r.choices[0].message.content

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == refs
        assert s.engine.scheduler.preempted > 0


def _png_data_url(color) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_images_end_to_end(model, tok, stops, tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 70), (0, 200, 30)).save(tmp_path / "green.png")
    with LiveServer(model, tok, allowed_media_dirs=[tmp_path]) as s:
        client = s.client()
        for url in (_png_data_url((200, 10, 10)), f"file://{tmp_path / 'green.png'}"):
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What colour is it?"}]}]
            p = encode_prompt(tok, msgs, model.config)
            ref = llama4.generate(model, p.ids, max_new_tokens=10, stop_ids=stops, pixel_values=p.pixel_values)
            r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=10)
            assert r.choices[0].message.content == _ref_text(tok, ref, stops)
            assert r.usage.prompt_tokens == len(p.ids)


def test_video_as_data_url(model, tok, stops, tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[10:18, 2 * i:2 * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "Where does it move?"}]}]
    p = encode_prompt(tok, msgs, model.config)
    ref = llama4.generate(model, p.ids, max_new_tokens=8, stop_ids=stops, pixel_values=p.pixel_values)
    with LiveServer(model, tok) as s:
        r = s.client().chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == _ref_text(tok, ref, stops)
    assert r.usage.prompt_tokens == len(p.ids)


def test_sampling_seed_and_n(server):
    client = server.client()
    kw = dict(model="tiny", messages=_chat(5), temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # each choice has its own seed
    stop = a.choices[0].message.content[3:6]
    c = client.chat.completions.create(n=1, stop=[stop], **kw)
    assert c.choices[0].message.content == a.choices[0].message.content.split(stop)[0]
    assert c.choices[0].finish_reason == "stop"


def test_graceful_shutdown_finishes_running_requests(model, tok, stops):
    s = LiveServer(model, tok).__enter__()
    ref = _ref_text(tok, llama4.generate(model, tok.encode_chat(_chat(9)), max_new_tokens=60, stop_ids=stops), stops)
    stream = s.client().chat.completions.create(model="tiny", messages=_chat(9), temperature=0, max_tokens=60,
                                                stream=True)
    first = next(iter(stream))
    s.server.should_exit = True  # what SIGTERM does
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in stream
                                                             if c.choices)
    assert text == ref
    s.thread.join(30)
    assert not s.thread.is_alive() and not s.engine.thread.is_alive()

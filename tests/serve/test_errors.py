"""Every refused request gets its status code and OpenAI's error body, never a traceback."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

import llama4
from conftest import LiveServer

pytestmark = pytest.mark.usefixtures("one_thread")

ASSET = llama4.__file__.rsplit("/", 1)[0] + "/assets/default_model"
KEY = "sekrit"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = llama4.Tokenizer(ASSET + "/tokenizer.json")
    model = llama4.Llama4(llama4.load_config(ASSET)).init_weights(std=0.08, seed=0).eval()
    media = tmp_path_factory.mktemp("media")
    with LiveServer(model, tok, api_key=KEY, max_body_bytes=20_000, max_running=1, max_queue=0,
                    allowed_media_dirs=[media]) as s:
        s.media = media
        yield s


def _post(server, body, path="/v1/chat/completions", key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def _check(resp, status, param=None, code=None, match=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if match is not None:
        assert match in err["message"], err["message"]
    return err


def _chat(**kw):
    return {"model": "tiny", "messages": MSGS, "max_tokens": 4, **kw}


@pytest.mark.parametrize("key", [None, "wrong"])
def test_api_key(server, key):
    _check(_post(server, _chat(), key=key), 401, code="invalid_api_key")
    assert _post(server, _chat(temperature=0)).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert [m.id for m in server.client(api_key=KEY).models.list().data] == ["tiny"]


@pytest.mark.parametrize("body,status,param,code,match", [
    (_chat(foo=1), 400, "foo", "unknown_field", "unknown field"),
    (_chat(temperature=5), 400, "temperature", None, None),
    (_chat(top_p=0), 400, "top_p", None, None),
    (_chat(max_tokens=0), 400, "max_tokens", None, None),
    (_chat(n=0), 400, "n", None, None),
    (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None, None),
    (_chat(presence_penalty=0.5), 400, "presence_penalty", None, None),
    ({"model": "tiny"}, 400, "messages", None, "missing"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages", None, "unknown role"),
    (_chat(model="gpt-4"), 404, "model", "model_not_found", None),
    (_chat(max_tokens=10 ** 6), 400, None, "context_length_exceeded", "context window"),
    (_chat(messages=[{"role": "user", "content": "a " * 9000}]), 400, None, "context_length_exceeded", None),
    (_chat(messages=[{"role": "user", "content": "word " * 6000}]), 413, None, None, None),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]),
     400, "messages.0.content.0.image_url", "url_not_allowed", "network URLs"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
     400, None, "url_not_allowed", "outside the allowed"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400,
     "messages", None, None),
], ids=["unknown_field", "temperature", "top_p", "max_tokens", "n", "stop", "presence_penalty", "missing_messages",
        "bad_role", "model", "window", "long_prompt", "body_size", "network_url", "file_outside", "bad_image"])
def test_bad_chat_requests(server, body, status, param, code, match):
    _check(_post(server, body), status, param, code, match)


def test_malformed_and_odd_bodies(server):
    _check(_post(server, None, raw=b'{"model": "tiny", "messages": ['), 400, code="invalid_json")
    _check(_post(server, None, raw=b"[1, 2]"), 400, match="JSON object")
    _check(_post(server, None, raw=b"\xff\xfe"), 400, code="invalid_json")
    _check(_post(server, {"model": "tiny", "prompt": [99999], "max_tokens": 2}, "/v1/completions"), 400,
           param="prompt", match="vocabulary")
    _check(_post(server, {"model": "tiny", "prompt": "x", "max_tokens": 2, "suffix": "y"}, "/v1/completions"),
           400, param="suffix")
    _check(httpx.get(server.url + "/v1/nothing"), 404)
    _check(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_queue_full_gets_429_and_shutdown_503(server):
    # max_running=1, max_queue=0: while one request streams, the next is refused with Retry-After.
    body = {**_chat(), "max_tokens": 3000, "stream": True, "temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body,
                                                  headers=headers) as resp:
        lines = resp.iter_lines()  # kept: dropping the iterator closes the stream (a disconnect)
        next(lines)
        r = _post(server, _chat())
        _check(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            server.client(api_key=KEY).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    deadline = time.monotonic() + 10
    while server.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    server.engine.draining = True  # what a shutdown does first
    try:
        r = _post(server, _chat())
        _check(r, 503)
        assert "retry-after" in r.headers
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.engine.draining = False
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_file_url_inside_allowed_dir_works(server):
    from PIL import Image

    Image.new("RGB", (30, 30), (10, 10, 250)).save(server.media / "blue.png")
    body = _chat(temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{server.media / 'blue.png'}"}},
        {"type": "text", "text": "colour?"}]}])
    r = _post(server, body)
    assert r.status_code == 200, r.text
    text_only = _post(server, _chat(messages=[{"role": "user", "content": "colour?"}]))
    assert r.json()["usage"]["prompt_tokens"] > text_only.json()["usage"]["prompt_tokens"] + 4  # the image's slots
    link = server.media / "escape.png"
    link.symlink_to("/etc/hostname")
    body["messages"][0]["content"][0]["image_url"]["url"] = f"file://{link}"
    _check(_post(server, body), 400, code="url_not_allowed")
    assert json.loads(httpx.get(server.url + "/health").text)["status"] == "ok"

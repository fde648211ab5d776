"""Shared fixtures: tiny random transformers Llama 4 models saved to disk, as oracles."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llama4
from llama4.config import config_to_hf


def hf_model(cfg: llama4.Llama4Config, seed: int = 0, std: float = 0.08):
    """A transformers Llama 4 model for `cfg` (multimodal if it has vision), with weights large
    enough that a wrong layer changes the logits visibly (HF's default init is too small)."""
    from transformers import Llama4Config as HFConfig
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    d = config_to_hf(cfg, spelling=5)
    d.pop("architectures")
    torch.manual_seed(seed)
    if cfg.vision is None:
        model = Llama4ForCausalLM(Llama4TextConfig(**d))
    else:
        model = Llama4ForConditionalGeneration(HFConfig(**d))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


def hf_text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Text-only logits from either transformers class (its multimodal forward needs images)."""
    lm = getattr(model, "language_model", model)
    with torch.no_grad():
        return lm(input_ids=ids).logits


def save_hf(model, path: Path, *, spelling4: bool = False) -> Path:
    """save_pretrained; optionally rewrite config.json in the transformers 4.x spelling with the
    published int `attn_temperature_tuning`, as the real checkpoints ship."""
    model.save_pretrained(path)
    if spelling4:
        f = path / "config.json"
        d = json.loads(f.read_text())
        text = d.get("text_config", d)
        params = text.pop("rope_parameters")
        text["rope_theta"] = params.pop("rope_theta")
        text["rope_scaling"] = None if params.get("rope_type") == "default" else params
        text.pop("layer_types", None)
        text["attn_temperature_tuning"] = 4 if text.get("attn_temperature_tuning") else 0
        f.write_text(json.dumps(d, indent=2))
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def small_text(**overrides) -> llama4.Llama4Config:
    """A text-only config small enough for fast parity tests; chunked attention with small chunks."""
    base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, intermediate_size_mlp=128, num_local_experts=4,
                attention_chunk_size=32, floor_scale=8, attn_scale=0.5, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    base.update(overrides)
    return llama4.Llama4Config(llama4.TextConfig(**base), None, name="test")


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP workers make
    every small op wait on descheduled peers (~20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def in_child(fn, kill_after_step: int | None = None, kill_after_s: float | None = None) -> tuple[int, int]:
    """Run fn() in a forked process, SIGKILLed right after its `kill_after_step`-th rename/replace/delete
    (checkpoint/atomic.py's `rename_hook`) or after `kill_after_s` seconds. Returns (wait status, steps made)."""
    from llama4.checkpoint import atomic

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            count = 0

            def hook(op, path):
                nonlocal count
                count += 1
                os.write(w, b".")
                if count == kill_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)

            atomic.rename_hook = hook
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        steps = len(f.read())
    return status, steps


class LiveServer:
    """`llama4 serve`'s app on a real uvicorn server on 127.0.0.1 at a free port, in a thread."""

    def __init__(self, model, tokenizer, *, kv_memory: int = 32 << 20, block_size: int = 16, max_running: int = 64,
                 prefill_chunk: int = 64, **cfg):
        import socket
        import threading

        import uvicorn

        from llama4.cli.serve import build_engine
        from llama4.serve.app import ServeConfig, create_app

        self.engine = build_engine(model, tokenizer, kv_memory=kv_memory, block_size=block_size,
                                   max_running=max_running, prefill_chunk=prefill_chunk)
        self.app = create_app(self.engine, tokenizer, ServeConfig(**{"model_name": "tiny", **cfg}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=cfg.get("shutdown_timeout", 10)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __exit__(self, *exc) -> None:
        self.stop()

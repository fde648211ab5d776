"""`llama4 eval`: answer held-out chat questions greedily and report exact-match accuracy by modality and task.

Reads chat JSONL as `llama4 data synth` writes it (the last message is the assistant's reference
answer; optional "task" and "modality" fields group the scores). Without `--data`, the held-out split
of the synthetic dataset is regenerated (same seed, so the same questions) at the model's tile size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.jsonl import iter_jsonl
from ..data.synth import make_dataset
from ..generation import generate
from ..media.prompt import encode_prompt


@dataclass
class EvalResult:
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, got)

    def add(self, groups: list[str], ok: bool) -> None:
        for g in groups:
            self.total[g] += 1
            self.correct[g] += ok

    def accuracy(self, group: str) -> float:
        return self.correct[group] / self.total[group] if self.total[group] else float("nan")

    def summary(self) -> dict[str, dict]:
        return {g: {"accuracy": self.accuracy(g), "correct": self.correct[g], "total": self.total[g]}
                for g in sorted(self.total)}


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!").split())


def _absolute(messages: list, base: Path) -> list:
    """Media paths in the file are relative to it; make them absolute for the loaders."""
    out = json.loads(json.dumps(messages))
    for msg in out:
        for part in msg.get("content") if isinstance(msg.get("content"), list) else []:
            for key in ("image_url", "video_url"):
                ref = part.get(key) if isinstance(part, dict) else None
                if isinstance(ref, dict) and isinstance(ref.get("url"), str) and "://" not in ref["url"] \
                        and not ref["url"].startswith("data:") and not Path(ref["url"]).is_absolute():
                    ref["url"] = str(base / ref["url"])
    return out


def read_samples(path: Path) -> list[dict]:
    samples = []
    for where, s in iter_jsonl(path):
        msgs = s.get("messages") if isinstance(s, dict) else None
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
            raise ValueError(f"{where}: expected {{'messages': [..., {{'role': 'assistant', 'content': str}}]}} "
                             f"with the reference answer last")
        samples.append(s)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def evaluate(model, tokenizer, data: str | Path, *, limit: int | None = None, num_frames: int = 4,
             max_new_tokens: int = 8) -> EvalResult:
    """Greedy answers to every sample's question, compared with its reference answer."""

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation data not found")
    samples = read_samples(path)[:limit]
    result = EvalResult()
    stop = set(model.config.text.eos_token_id)
    for s in samples:
        messages = _absolute(s["messages"], path.parent)
        prompt = encode_prompt(tokenizer, messages[:-1], model.config, num_frames=num_frames)
        with torch.no_grad():
            new = generate(model, prompt.ids, max_new_tokens=max_new_tokens, pixel_values=prompt.pixel_values)
        got = tokenizer.decode([t for t in new if t not in stop])
        expected = messages[-1]["content"]
        ok = normalise(got) == normalise(expected)
        result.add(["all", s.get("modality", "text"), f"{s.get('modality', 'text')}/{s.get('task', '-')}"], ok)
        if len(result.examples) < 12:
            question = next((p.get("text") for p in messages[-2]["content"] if isinstance(p, dict)
                             and p.get("type") == "text"), "") if isinstance(messages[-2]["content"], list) \
                else messages[-2]["content"]
            result.examples.append((question, expected, got))
    return result


def heldout_synthetic(model, out_dir: Path, n: int = 400, seed: int = 0) -> Path:

    if model.config.vision is None:
        raise ValueError("the synthetic held-out set needs a model with a vision encoder")
    make_dataset(out_dir, n_train=0, n_heldout=n, image_size=model.config.vision.image_size, seed=seed)
    return out_dir / "heldout.jsonl"

"""Next-token choice from logits: greedy, or temperature with top-k / top-p / min-p, plus a repetition penalty.

The processors run in transformers' order (repetition penalty, temperature, top-k, top-p, min-p), so
the same settings mean the same thing in both.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off; repetition_penalty 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def real(name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
                raise ValueError(f"{name}={v!r} is invalid: expected a finite number {bound}")

        real("temperature", 0.0)
        real("top_p", 0.0, 1.0, lo_open=True)
        real("min_p", 0.0, 1.0)
        real("repetition_penalty", 0.0, lo_open=True)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid: expected an int >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def penalize_repeats(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in the row's context less likely: positive logits are divided by the
    penalty, negative ones multiplied (the CTRL / transformers convention)."""
    hit = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, hit, logits_BV)


def filter_logits(logits_BV: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf. Expects fp32 logits.

    The row maximum is subtracted before dividing by the temperature: the same distribution, but a
    tiny temperature (1e-45) then sends the others to -inf and keeps the maximum at 0, instead of
    turning every logit into +-inf and the softmax into NaN. It tends to greedy, as it should."""
    logits_BV = (logits_BV - logits_BV.max(-1, keepdim=True).values) / p.temperature
    if 0 < p.top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, p.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, -math.inf)
    if p.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Keep the smallest head whose mass reaches top_p: drop a token once the mass before it does.
        drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= p.top_p
        drop_sorted_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV), -math.inf)
    if p.min_p > 0.0:
        probs_BV = logits_BV.softmax(-1)
        floor_B1 = p.min_p * probs_BV.max(-1, keepdim=True).values
        logits_BV = logits_BV.masked_fill(probs_BV < floor_B1, -math.inf)
    return logits_BV


def sample(logits_BV: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row [B]. `seen_BV` marks tokens already in each row (for the repetition penalty)."""
    logits_BV = logits_BV.float()
    if p.repetition_penalty != 1.0 and seen_BV is not None:
        logits_BV = penalize_repeats(logits_BV, seen_BV, p.repetition_penalty)
    if p.greedy:
        return logits_BV.argmax(-1)
    probs_BV = filter_logits(logits_BV, p).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)

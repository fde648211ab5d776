"""Turning a request's token events into OpenAI text: stop strings, held-back text, logprobs, tool calls.

One `ChoiceText` per choice. Tokens arrive one at a time; text is released only when it is whole
characters and cannot be the start of a stop string, so a stream never shows a stop string (or half
an emoji) that the final answer would not contain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation.scheduler import TokenEvent


@dataclass
class ChoiceText:
    tokenizer: object
    stop_ids: frozenset[int]
    stop_strings: list[str]
    text: str = ""  # everything decoded so far (cut at a stop string once one appears)
    sent: int = 0  # characters of `text` already released
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    stopped: bool = False  # a stop string was found: later tokens are dropped

    def __post_init__(self):
        self.decoder = self.tokenizer.stream()
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def push(self, ev: TokenEvent) -> str:
        """Feed one event; returns the text that can be released now."""
        if ev.token is not None and not self.stopped:
            self.tokens.append(ev.token)
            if ev.token not in self.stop_ids:  # <|eot|> and friends end the turn; they are not content
                if ev.logprob is not None:
                    self.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
                self.text += self.decoder.push(ev.token)
                self._cut()
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error
            if self.finish_reason == "length" and self.stopped:
                self.finish_reason = "stop"
            if not self.stopped:
                self.text += self.decoder.flush()
                self._cut()
        return self.release()

    def _cut(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def release(self) -> str:
        done = self.finish_reason is not None or self.stopped
        upto = len(self.text) if done else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:upto], upto
        return out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def token_str(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def chat_logprobs(tokenizer, entries) -> dict:
    """OpenAI chat `logprobs` ({"content": [...]}) for (token, logprob, top) entries."""
    def one(tok, lp):
        b = tokenizer.decode_bytes([tok])
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**one(t, lp), "top_logprobs": [one(tt, tlp) for tt, tlp in (top or [])]}
                        for t, lp, top in entries]}


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """OpenAI completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for t, lp, top in entries:
        s = token_str(tokenizer, t)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if top is None else {token_str(tokenizer, tt): tlp for tt, tlp in top})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

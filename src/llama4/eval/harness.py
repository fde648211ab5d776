"""lm-eval-harness over llama4: an `LM` whose requests run on our scoring API and generation engine.

`Llama4LM` follows the conventions of lm-eval's own `hf` backend (`HFLM`) on the same checkpoint, so
both give the same figures (tests/eval/test_harness.py checks it):

* text is encoded as transformers encodes it for a Llama 4 checkpoint: `<|begin_of_text|>` first
  unless the text already starts with it, and special-token strings in the text are special tokens;
* an empty context is the BOS token (`prefix_token_id`); a context + continuation longer than
  `max_length` + 1 loses tokens on the left of the context;
* `loglikelihood` runs on `llama4.score` (batched; choices of one question share its prefill by
  forking the KV cache); `loglikelihood_rolling` on `llama4.score_rolling`: a document that fits
  `max_length` is one window, fed through the KV cache; a longer one gets lm-eval's disjoint windows
  of `max_length`, each at positions 0.. as `hf` runs them (`relative=True`), so every position
  stays within the model's trained range;
* `generate_until` decodes greedily (or samples, with do_sample) through `generate_batch`, stops
  on the checkpoint's stop ids and the request's `until` strings, drops special tokens and cuts at
  the first stop string;
* chat templates: `apply_chat_template` renders the checkpoint's template as transformers does
  (`continue_final_message` when no generation prompt is added).

lm-eval is an optional dependency (the `dev` extra): importing this module needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..generation import generate_batch
from ..text.template import CHAT_TEMPLATE, render_chat_template
from .score import DEFAULT_BATCH_TOKENS, score, score_rolling

# transformers' marker for continue_final_message (utils/chat_template_utils.py)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@register_model("llama4")
class Llama4LM(TemplateLM):
    """`lm_eval --model llama4 --model_args pretrained=DIR`, or `Llama4LM(model=..., tokenizer=...)`."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, dtype: str = "auto",
                 max_length: int | None = None, max_gen_toks: int = 256, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 batch_size: int | str = 16, seed: int = 1234, prefix_token_id: int | None = None, **_ignored: Any):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("Llama4LM needs a checkpoint directory (pretrained=DIR) or a model and its tokenizer")
        if model is None:
            from ..checkpoint import load
            from ..text.tokenizer import Tokenizer

            root = Path(pretrained)
            if not root.is_dir():
                raise FileNotFoundError(f"pretrained={pretrained}: no such checkpoint directory")
            dtypes = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                      "bfloat16": torch.bfloat16}
            if dtype not in dtypes:
                raise ValueError(f"dtype={dtype!r}: expected one of {sorted(dtypes)}")
            model = load(root, dtype=dtypes[dtype]).eval()
            if tokenizer is None:
                tok_path = next((root / n for n in ("tokenizer.json", "tokenizer.model") if (root / n).is_file()), None)
                tokenizer = Tokenizer(tok_path)
        if tokenizer is None:
            raise ValueError("Llama4LM(model=...) needs its tokenizer too (tokenizer=llama4.Tokenizer(...))")
        self.model, self.tokenizer = model, tokenizer
        self.name = str(pretrained or getattr(tokenizer, "path", "llama4"))
        self._max_length = int(max_length or model.config.text.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_tokens = int(batch_tokens)
        # lm-eval's batch_size ("auto", "auto:N" or a count) sets the prompts per generation batch; scoring
        # batches by tokens (batch_tokens) instead
        self.gen_batch = 16 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        self.seed = seed
        self.custom_prefix_token_id = prefix_token_id
        info = getattr(model, "side_info", None)
        self._chat_template = (info.chat_template if info is not None else None) or CHAT_TEMPLATE
        self._special_ids = set(tokenizer.special_tokens.values())
        self._bos_text = "<|begin_of_text|>"

    # What lm-eval asks about the model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id  # the checkpoint's HF eos_token (tokenizer_config.json)

    @property
    def prefix_token_id(self) -> int:
        return self.custom_prefix_token_id if self.custom_prefix_token_id is not None else self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.model.output.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a few-shot chat, rendered as transformers' `apply_chat_template(tokenize=False,
        continue_final_message=not add_generation_prompt)` renders it."""
        chat = [dict(m) for m in chat_history]
        if add_generation_prompt or not chat:
            return render_chat_template(self._chat_template, chat, add_generation_prompt)
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
        text = render_chat_template(self._chat_template, chat, False)
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0 or final.strip() not in text:
            raise ValueError("the chat template dropped part of the final message, so it cannot be continued")
        return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.output.weight.dtype), "model_name": self.name}

    # Text <-> ids ------------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """BOS first (as a Llama 4 checkpoint's HF tokenizer adds it) unless asked not to or the text starts
        with it; special-token strings are special tokens, as transformers reads them."""
        bos = add_special_tokens if add_special_tokens is not None else not string.startswith(self._bos_text)
        ids = self.tokenizer.encode(string, bos=bos, allow_special=True)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self._special_ids])

    # Requests ----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        contexts, continuations = [], []
        for _, ctx, cont in requests:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored (expected 1 to max_length = "
                                 f"{self.max_length} tokens)")
            keep = self.max_length + 1 - len(cont)  # inputs are ctx + cont[:-1]: at most max_length of them
            contexts.append(ctx[-keep:])
            continuations.append(cont)
        total = sum(len(c) for c in set(map(tuple, contexts))) + sum(len(x) - 1 for x in continuations)  # shared
        with tqdm(total=total, unit="tok", desc="loglikelihood", disable=disable_tqdm) as bar:
            scores = score(self.model, contexts, continuations, batch_tokens=self.batch_tokens, progress=bar.update)
        out = []
        for (pair, _, _), s in zip(requests, scores):
            result = (s.logprob, s.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [[self.prefix_token_id] + self.tok_encode(req.args[0]) for req in requests]
        total = sum(len(d) - 1 for d in docs)
        out: list[float | None] = [None] * len(docs)
        with tqdm(total=total, unit="tok", desc="loglikelihood_rolling", disable=disable_tqdm) as bar:
            short = [i for i, d in enumerate(docs) if len(d) - 1 <= self.max_length]  # one window: the KV path
            for i, s in zip(short, score_rolling(self.model, [docs[i] for i in short], batch_tokens=self.batch_tokens,
                                                 progress=bar.update) if short else []):
                out[i] = s.logprob
            for i, d in enumerate(docs):
                if out[i] is None:
                    out[i] = score_rolling(self.model, d, window=self.max_length, relative=True,
                                           progress=bar.update).logprob
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id])
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
                until = [u for u in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if u]
                max_new = kwargs.pop("max_gen_toks")
                if max_new >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt (max_length {self.max_length})")
                sampling = dict(temperature=float(kwargs.get("temperature", 0.0)), seed=self.seed) \
                    if kwargs.get("do_sample") else {}
                if sampling:
                    sampling.update(top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0) or 0))
                for a in range(0, len(idx), self.gen_batch):
                    part = idx[a:a + self.gen_batch]
                    prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                               for i in part]
                    new = generate_batch(self.model, prompts, max_new_tokens=max_new, stop_strings=until,
                                         tokenizer=self.tokenizer, **sampling)
                    for i, ids in zip(part, new):
                        text = postprocess_generated_text(self.tok_decode(ids), until, None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        out[i] = text
                    bar.update(len(part))
        return out

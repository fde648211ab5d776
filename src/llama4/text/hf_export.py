"""Our tokenizer as transformers reads it: `tokenizer.json`, `tokenizer_config.json`, the chat template.

Meta's `tokenizer.model` (tiktoken ranks) has no merges list; a byte-level BPE `tokenizer.json` needs
one. The merges are recovered from the ranks as transformers' TikTokenConverter recovers them (each
token of rank r splits into two shorter tokens; the splits are ordered by r), and `ignore_merges`
makes a pre-token that is itself in the vocabulary one id, as tiktoken does. The pre-tokenizer is
Llama 4's own split pattern. Tests check the ids against tiktoken's.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from .template import CHAT_TEMPLATE
from .tokenizer import SPLIT_PATTERN, Tokenizer

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def _tiktoken_to_json(path: str, mtime: float) -> str:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import SPECIAL_TOKENS

    ranks = _read_ranks(Path(path))
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(rank, lr) for lr in local]
    merges.sort(key=lambda m: m[0])
    u = _bytes_to_unicode()
    text = lambda b: "".join(u[c] for c in b)  # noqa: E731
    vocab = {text(b): r for b, r in ranks.items()}
    bpe = models.BPE(vocab=vocab, merges=[(text(a), text(b)) for _, (a, b) in merges], ignore_merges=True)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    _add_bos(tok, processors)
    return tok.to_str()


def _add_bos(tok, processors) -> None:
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """`tokenizer.json` text for our tokenizer (converted from tiktoken ranks, or the file itself with
    a post-processor that adds `<|begin_of_text|>`, as `encode(bos=True)`)."""
    path = Path(tokenizer.path)
    if path.suffix != ".json":
        return _tiktoken_to_json(str(path), path.stat().st_mtime)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    tok = HFTokenizer.from_file(str(path))
    _add_bos(tok, processors)
    return tok.to_str()


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    """`tokenizer_config.json`: special tokens by name (bos / eos / pad), the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,  # what a chat turn ends with; generation_config.json lists every stop id
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, bytes]:
    """Every tokenizer file a save carries: ours (read back by `Tokenizer(dir)`) and transformers'."""
    files = {"tokenizer.json": hf_tokenizer_json(tokenizer).encode(),
             "tokenizer_config.json": json.dumps(tokenizer_config(tokenizer, model_max_length), indent=2).encode(),
             "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}).encode(),
             "chat_template.jinja": CHAT_TEMPLATE.encode()}
    if Path(tokenizer.path).suffix != ".json":  # Meta's own file too: it is the published one, bit for bit
        files["tokenizer.model"] = Path(tokenizer.path).read_bytes()
    return files

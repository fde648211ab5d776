"""`llama4 tokenizer train`: a small byte-level BPE for small models, with every Llama 4 special token.

The published tokenizer has 202,048 ids, which would make the embedding the largest part of a tiny
model. This trains a few hundred or thousand ordinary tokens on the caller's corpus with the same
pre-tokenizer pattern, then appends the 2,048 special tokens (same strings, same order) so the chat
format and stop ids work unchanged. The result is a `tokenizer.json` that `llama4.Tokenizer(dir)` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def train_tokenizer(corpus: list[str | Path], vocab_size: int, out: str | Path) -> Path:
    """Train on the corpus files; `vocab_size` ordinary tokens (256 bytes + merges), specials after them."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    missing = [str(f) for f in corpus if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus file(s) not found: {', '.join(missing)}")
    if vocab_size < 256:
        raise ValueError(f"--vocab-size {vocab_size} is below 256; a byte-level BPE needs a token for every byte")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(f) for f in corpus], trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids follow the ordinary vocabulary, in Llama 4's order
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def cmd_train(args: argparse.Namespace) -> int:
    path = train_tokenizer(args.corpus, args.vocab_size, args.out)
    tok = Tokenizer(path)
    ordinary = tok.vocab_size - len(tok.special_tokens)
    print(f"wrote {path}: {ordinary:,} ordinary + {len(tok.special_tokens):,} special = {tok.vocab_size:,} ids")
    if ordinary < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge before reaching --vocab-size {args.vocab_size:,}")
    return 0


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a small byte-level BPE that keeps the Llama 4 special tokens")
    t.add_argument("--corpus", nargs="+", required=True, help="UTF-8 text file(s) to train on")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="ordinary tokens (>= 256); the 2,048 special tokens come on top")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    t.set_defaults(func=cmd_train)

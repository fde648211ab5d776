"""`llama4 tokenizer train`: a small byte-level BPE for small models, with every Llama 4 special token.

The published tokenizer has 202,048 ids, which would make the embedding the largest part of a tiny
model. This trains a few hundred or thousand ordinary tokens on the caller's corpus with the same
pre-tokenizer pattern, then appends the 2,048 special tokens (same strings, same order) so the chat
format and stop ids work unchanged. The result is a `tokenizer.json` that `llama4.Tokenizer(dir)` loads.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    """ValueError naming the file, line and byte of the first invalid UTF-8 (the trainer would only
    say "stream did not contain valid UTF-8"). Streams the file: corpora may be large."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset + max(e.start, 0)
                line += data[:max(e.start, 0)].count(b"\n")
                raise ValueError(f"corpus file {path}: line {line} (byte {at}) is not valid UTF-8; "
                                 f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not data:
                return
            line += data.count(b"\n")
            offset += len(data)


def train_tokenizer(corpus: list[str | Path], vocab_size: int, out: str | Path) -> Path:
    """Train on the corpus files; `vocab_size` ordinary tokens (256 bytes + merges), specials after them."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    missing = [str(f) for f in corpus if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus file(s) not found: {', '.join(missing)}")
    if vocab_size < 256:
        raise ValueError(f"--vocab-size {vocab_size} is below 256; a byte-level BPE needs a token for every byte")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory (tokenizer.json is written into a directory)")
    for f in corpus:
        _check_utf8(Path(f))
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
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path

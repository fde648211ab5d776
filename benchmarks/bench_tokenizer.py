"""Encode throughput: llama4.Tokenizer vs llama_models' Llama 4 tokenizer on the same ~10 MB of text.

    .venv/bin/python benchmarks/bench_tokenizer.py [--mb 10] [--file corpus.txt] [--repeats 3]

Without --file the text is the Python standard library's source (code, prose in docstrings, long
whitespace runs) plus multilingual filler, cut to --mb megabytes. Both tokenizers must produce the same
ids; the script checks that before printing the ratio (best of --repeats alternating runs each).
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from pathlib import Path

from llama_models.llama4.text.tokenizer import Tokenizer as MetaTokenizer

from llama4 import Tokenizer


def default_text(n_bytes: int) -> str:
    parts, size = [], 0
    rng = random.Random(0)
    words = ["Llama", "模型", "トークン", "токен", "👍🏽", "naïve", "العربية", "한국어", "1234", "\n\n"]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts += [text, " ".join(rng.choice(words) for _ in range(len(text) // 50))]
        size += len(parts[-2].encode()) + len(parts[-1].encode())
        if size >= n_bytes:
            break
    return "\n".join(parts).encode()[:n_bytes].decode(errors="ignore")


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time and output of each function; runs alternate so load changes hit both alike."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t0), out)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--file", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    n_bytes = int(args.mb * 1e6)
    text = args.file.read_text(encoding="utf-8")[:n_bytes] if args.file else default_text(n_bytes)
    mb = len(text.encode()) / 1e6
    ours, meta = Tokenizer(), MetaTokenizer.get_instance()
    best = best_times({"ours": lambda: ours.encode(text), "meta": lambda: meta.encode(text, bos=False, eos=False)},
                      args.repeats)
    (t_ours, ids_ours), (t_meta, ids_meta) = best["ours"], best["meta"]
    if ids_ours != ids_meta:
        raise SystemExit("ids differ between llama4.Tokenizer and llama_models' Tokenizer")
    print(f"text          {mb:.1f} MB, {len(text):,} chars -> {len(ids_ours):,} tokens (identical ids)")
    print(f"llama_models  {t_meta:6.2f} s  {mb / t_meta:6.1f} MB/s")
    print(f"llama4        {t_ours:6.2f} s  {mb / t_ours:6.1f} MB/s")
    print(f"speedup       {t_meta / t_ours:.2f}x")


if __name__ == "__main__":
    main()

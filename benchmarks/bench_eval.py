"""lm-eval-harness through llama4 vs through lm-eval's own `hf` backend (transformers), same checkpoint.

A random Llama4ForCausalLM with the published 202,048-token vocabulary and tokenizer is saved by
transformers; lm-eval's `simple_evaluate` runs two generated local tasks on it, once per backend:
a 4-way multiple-choice task (long shared contexts: our LM prefills each context once and forks the
KV cache for its four choices; `hf` at batch size 1 runs each choice as its own forward) and rolling
perplexity over four ~1k-token documents (ours: chunked log-probs through the KV cache; `hf`: one
forward with [T, vocab] logits). Prints the wall and CPU seconds of each backend, their ratio, and the
largest log-likelihood difference between them.

    flock /tmp/bench.lock env PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py --threads 1
    ... benchmarks/bench_eval.py --threads 1 --long 16384   # ours only: rolling log-likelihood of one long
                                                           # document, time and peak RSS (fresh process)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from common import ROOT, machine, random_hf_checkpoint, run_measured, set_threads, table, time_wall_cpu

# One document scored in a fresh process; the peak RSS restarts after loading (activations, KV, logit chunks).
LONG_CHILD = """
import json, sys, time
import torch
from common import peak_rss_bytes, reset_peak_rss
import llama4
path, T, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = llama4.load(path, dtype=torch.float32).eval()
ids = torch.randint(0, 200000, (T,), generator=torch.Generator().manual_seed(0)).tolist()
reset_peak_rss()
base = peak_rss_bytes()
t, c = time.perf_counter(), time.process_time()
r = llama4.score_rolling(model, ids)
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "ppl": r.perplexity,
                  "peak": peak_rss_bytes() - base}))
"""

TEXT = (ROOT / "README.md").read_text() + (ROOT / "docs" / "generation.md").read_text()


def make_tasks(root: Path, questions: int, context_words: int, doc_words: int) -> list[str]:
    words = TEXT.split()
    rows = []
    for q in range(questions):
        start = (q * 97) % (len(words) - context_words)
        passage = " ".join(words[start:start + context_words])
        choices = [" ".join(words[start + 7 * k:start + 7 * k + 3 + k]) for k in range(4)]
        rows.append({"passage": passage, "choices": choices, "answer": q % 4})
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": " ".join(words[i * doc_words:(i + 1) * doc_words])} for i in range(4)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{passage}}}}\\nWhich phrase comes next?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "bench_ppl.yaml").write_text(f"""task: bench_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'docs.jsonl'}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    return ["bench_mc", "bench_ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--context-words", type=int, default=300)
    ap.add_argument("--doc-words", type=int, default=700)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--long", type=int, default=None, help="only: score one random document of this many tokens")
    args = ap.parse_args()
    set_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import llama4
    from llama4.eval.harness import Llama4LM
    from llama4.text.hf_export import tokenizer_files

    work = Path(tempfile.gettempdir()) / "llama4_bench_eval"  # the checkpoint is reused between runs
    work.mkdir(exist_ok=True)
    tok = llama4.Tokenizer()  # the published one
    ckpt = random_hf_checkpoint(
        work / "ckpt", vocab_size=202048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, intermediate_size_mlp=512, num_local_experts=4,
        interleave_moe_layer_step=2, attention_chunk_size=256, floor_scale=32, max_position_embeddings=8192,
        bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    for name, data in tokenizer_files(tok, 8192).items():
        (ckpt / name).write_bytes(data)
    if args.long:
        out, _ = run_measured(LONG_CHILD, str(ckpt), str(args.long), str(args.threads or torch.get_num_threads()))
        print(machine())
        print(f"llama4.score_rolling, one {args.long}-token document (KV cache, 2048-token slices, 256-token logit "
              f"chunks): {out['wall']:.1f} s wall, {out['cpu']:.1f} s CPU ({args.long / out['cpu']:.0f} tok/s CPU), "
              f"peak RSS above the loaded model {out['peak'] / 2**20:.0f} MiB; [T, vocab] fp32 logits alone would be "
              f"{args.long * 202048 * 4 / 2**30:.1f} GiB")
        return
    tasks = make_tasks(work, args.questions, args.context_words, args.doc_words)
    manager = TaskManager(include_path=str(work), include_defaults=False)
    results = {}
    ours, theirs = Llama4LM(str(ckpt), dtype="fp32"), HFLM(pretrained=str(ckpt), batch_size=1, device="cpu",
                                                          dtype="float32")

    def run(name, lm):
        return lambda: results.__setitem__(name, simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                                                 log_samples=True, bootstrap_iters=0))

    times = time_wall_cpu({"llama4": run("llama4", ours), "hf": run("hf", theirs)}, repeat=args.repeat, warmup=0)
    worst = {}
    for task in tasks:
        diffs = []
        for a, b in zip(results["llama4"]["samples"][task], results["hf"]["samples"][task]):
            for ra, rb in zip(a["resps"], b["resps"]):
                x, y = (ra[0][0], rb[0][0]) if isinstance(rb[0], (tuple, list)) else (ra[0], rb[0])
                diffs.append(abs(float(x) - float(y)))
        worst[task] = max(diffs)
    n_mc = len(results["hf"]["samples"]["bench_mc"])
    ctx_tokens = sum(len(tok.encode(r["passage"])) for r in map(json.loads, (work / "mc.jsonl").read_text().splitlines()))
    print(machine())
    print(f"checkpoint: D=128, 4 layers, 4 experts, vocab 202,048; {n_mc} questions x 4 choices "
          f"(~{ctx_tokens // n_mc} context tokens each), 4 documents of ~{args.doc_words} words")
    print(table(["backend", "wall s", "CPU s", "acc", "word ppl"],
                [[name, f"{w:.2f}", f"{c:.2f}", f"{results[name]['results']['bench_mc']['acc,none']:.4f}",
                  f"{results[name]['results']['bench_ppl']['word_perplexity,none']:.6g}"]
                 for name, (w, c) in times.items()]))
    print(f"hf / llama4: wall {times['hf'][0] / times['llama4'][0]:.2f}x, CPU {times['hf'][1] / times['llama4'][1]:.2f}x")
    print("largest |log-likelihood difference|: " + ", ".join(f"{t} {d:.2e}" for t, d in worst.items()))


if __name__ == "__main__":
    main()

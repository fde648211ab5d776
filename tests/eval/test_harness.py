"""lm-eval-harness: our `LM` against lm-eval's own `hf` backend on the same checkpoint.

A tiny random Llama4ForCausalLM is built and saved with transformers (with our tokenizer files), then
lm-eval's evaluator runs three local tasks (tests/fixtures/lm_eval: multiple choice, rolling perplexity,
generation) once through `HFLM` and once through `llama4 eval lm-eval`: every log-likelihood within
1e-4, every generation and accuracy equal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import llama4  # noqa: E402
from conftest import hf_model, save_hf, small_text  # noqa: E402
from llama4.cli import main  # noqa: E402
from llama4.text.hf_export import tokenizer_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["llama4_test_mc", "llama4_test_rolling", "llama4_test_gen"]
DEFAULT_TOK = Path(llama4.__file__).parent / "assets" / "default_model" / "tokenizer.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    tok = llama4.Tokenizer(DEFAULT_TOK)
    cfg = small_text(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                     eos_token_id=[tok.eos_id, tok.eom_id, tok.eot_id], max_position_embeddings=512)
    path = tmp_path_factory.mktemp("lmeval") / "ckpt"
    save_hf(hf_model(cfg, seed=0), path)
    for name, data in tokenizer_files(tok, 512).items():
        (path / name).write_bytes(data)
    old = os.getcwd()
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    yield path
    os.chdir(old)


def run(lm, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ROOT / "tests/fixtures/lm_eval"), include_defaults=False)  # fast
    return simple_evaluate(model=lm, tasks=kw.pop("tasks", TASKS), task_manager=manager, log_samples=True,
                           bootstrap_iters=0, **kw)


def hf_lm(path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), batch_size=1, device="cpu", dtype="float32", **kw)


def assert_same(ours: dict, theirs: dict, tasks=TASKS) -> None:
    ours, theirs = (json.loads(json.dumps(r, default=str)) for r in (ours, theirs))  # tuples -> lists, as saved
    for task in tasks:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]  # the same prompts
            for rx, ry in zip(x["resps"], y["resps"]):
                if isinstance(ry[0], str):  # generate_until: the same text
                    assert rx[0] == ry[0]
                elif isinstance(ry[0], (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    assert rx[0][0] == pytest.approx(ry[0][0], abs=1e-4) and bool(rx[0][1]) == bool(ry[0][1])
                else:  # loglikelihood_rolling: one logprob per document
                    assert rx[0] == pytest.approx(ry[0], abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if "stderr" in metric:
                continue
            if metric.startswith(("acc", "exact_match")):
                assert ours["results"][task][metric] == value, (task, metric)
            elif "perplexity" in metric or "bits_per_byte" in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)


def test_cli_equals_hf_backend(ckpt, tmp_path):
    out = tmp_path / "results.json"
    assert main(["eval", "lm-eval", "--model", str(ckpt), "--tasks", ",".join(TASKS), "--include-path",
                 "tests/fixtures/lm_eval", "--output", str(out), "--log-samples", "--bootstrap-iters", "0",
                 "--dtype", "fp32"]) == 0
    ours = json.loads(out.read_text())
    assert set(ours["results"]) == set(TASKS) and ours["results"]["llama4_test_mc"]["sample_len"] == 8
    assert_same(ours, run(hf_lm(ckpt)))


def test_long_documents_in_windows_equal_hf(ckpt):
    """max_length 24: every document spans several of lm-eval's windows."""
    import llama4.eval.harness  # noqa: F401  (registers lm-eval's model name "llama4")

    tasks = ["llama4_test_rolling"]
    ours = run("llama4", model_args=f"pretrained={ckpt},max_length=24", tasks=tasks)
    theirs = run(hf_lm(ckpt, max_length=24), tasks=tasks)
    assert_same(ours, theirs, tasks)


def test_chat_template_matches_transformers(ckpt):
    from llama4.eval.harness import Llama4LM

    ours, theirs = Llama4LM(str(ckpt)), hf_lm(ckpt)
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? "}]
    for chat, gen in ((history, True), (history + [{"role": "assistant", "content": "The answer is"}], False)):
        assert ours.apply_chat_template(chat, gen) == theirs.apply_chat_template(chat, gen)
    assert ours.chat_template(True) == theirs.chat_template(True)
    # the rendered prompt already starts with BOS: neither adds another
    text = ours.apply_chat_template(history)
    assert ours.tok_encode(text) == theirs.tok_encode(text)


def test_few_shot_chat_multiple_choice_equals_hf(ckpt):
    from llama4.eval.harness import Llama4LM

    kw = dict(tasks=["llama4_test_mc", "llama4_test_gen"], num_fewshot=2, apply_chat_template=True,
              fewshot_as_multiturn=True)
    assert_same(run(Llama4LM(str(ckpt)), **kw), run(hf_lm(ckpt), **kw), kw["tasks"])


def test_bad_arguments(ckpt, tmp_path, capsys):
    argv = ["eval", "lm-eval", "--model", str(ckpt), "--output", str(tmp_path / "r.json")]
    assert main(argv + ["--tasks", "llama4_test_mc", "--include-path", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--tasks", "x", "--limit", "1.5"])
    assert "expected a count >= 1 or a fraction" in capsys.readouterr().err


@pytest.mark.slow  # indexes lm-eval's ~15k built-in task YAMLs (seconds)
def test_unknown_task(ckpt, tmp_path, capsys):
    argv = ["eval", "lm-eval", "--model", str(ckpt), "--output", str(tmp_path / "r.json")]
    assert main(argv + ["--tasks", "no_such_task", "--include-path", "tests/fixtures/lm_eval"]) == 2
    assert "unknown task(s) ['no_such_task']" in capsys.readouterr().err

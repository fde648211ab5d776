"""Our GGUF export run by llama.cpp itself: `llama-simple` (greedy) emits the same tokens as llama4.

Needs a llama.cpp build (scripts/build_llamacpp.sh, from the llama-cpp-python sdist) in
$LLAMACPP_DIR (default /work/llama.cpp); with LLAMA4_BUILD_LLAMACPP=1 the test builds it (slow)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import llama4
from llama4.checkpoint.gguf import export_gguf
from llama4.cli import main
from test_convert import tiny_for_gguf, trained_tokenizer  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow
LLAMACPP = Path(os.environ.get("LLAMACPP_DIR", "/work/llama.cpp"))
TIE = 0.01  # top-2 logit margin under which fp32 summation order may flip the greedy choice
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_llamacpp.sh"


@pytest.fixture(scope="module")
def llama_simple() -> Path:
    binary = LLAMACPP / "build" / "bin" / "llama-simple"
    if not binary.is_file() and os.environ.get("LLAMA4_BUILD_LLAMACPP") == "1":
        subprocess.run(["flock", "/tmp/llamacpp.lock", "bash", str(SCRIPT)], check=True,
                       env={**os.environ, "LLAMACPP_DIR": str(LLAMACPP)})
    if not binary.is_file():
        pytest.skip(f"no llama.cpp build at {LLAMACPP} (build it with scripts/build_llamacpp.sh, or set "
                    f"LLAMA4_BUILD_LLAMACPP=1 to let this test build it)")
    return binary


def run_llama_simple(binary: Path, gguf_file: Path, prompt: str, n: int) -> bytes:
    out = subprocess.run([str(binary), "-m", str(gguf_file), "-n", str(n), prompt], capture_output=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    assert out.stdout.endswith(b"\n")
    return out.stdout[:-1]


def textlike(model, tok) -> None:
    """Scale the output rows of the special tokens down, so greedy decoding emits ordinary text (a
    random model would otherwise mostly pick one of the ~2000 special ids, some of which end generation)."""
    specials = sorted(tok.special_tokens.values())
    with torch.no_grad():
        model.output.weight[specials] *= 0.05


@pytest.mark.parametrize("prompt", ["The quick brown fox, 123 llamas!", "  Über   spaces\tand 4567 digits\n"])
def test_llama_simple_emits_our_greedy_tokens(prompt, llama_simple, trained_tokenizer, tmp_path):
    tok = trained_tokenizer
    model = tiny_for_gguf(tok, seed=7)
    textlike(model, tok)
    llama4.save(model, tmp_path / "hf", tokenizer=tok)
    gguf_file = tmp_path / "tiny.gguf"
    assert main(["convert", str(tmp_path / "hf"), str(gguf_file), "--to", "gguf", "--outtype", "f32"]) == 0

    n = 24
    ids = tok.encode(prompt, bos=True)
    loaded = llama4.load(tmp_path / "hf")
    ours = llama4.generate(loaded, ids, max_new_tokens=n, stop_ids=[])
    with torch.no_grad():
        top2 = loaded(torch.tensor([ids + ours]))[0, len(ids) - 1:].topk(2)
    margin = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    got = run_llama_simple(llama_simple, gguf_file, prompt, n)
    # llama-simple prints the prompt's tokens (so its tokenization shows too), then each new token. The
    # longest run of our tokens it reproduces:
    k = max(i for i in range(len(ours) + 1) if got.startswith(tok.decode_bytes(ids + ours[:i])))
    assert got.startswith(tok.decode_bytes(ids)), f"llama.cpp tokenized the prompt differently: {got!r}"
    if k < len(ours):
        # It may part only where our two best logits are a tie under float reordering, or stop at an
        # end-of-generation token (which it does not print).
        stopped = got == tok.decode_bytes(ids + ours[:k]) and ours[k] in tok.special_tokens.values()
        assert stopped or margin[k] < TIE, (f"llama.cpp parts from llama4 at new token {k} (our top-2 margin "
                                            f"{margin[k]:.4f}):\nllama.cpp: {got!r}\nllama4:    "
                                            f"{tok.decode_bytes(ids + ours)!r}")
    assert k >= 12, f"only {k} of {n} tokens compared before a tie or a stop: too few"


def test_exported_q8_0_runs_in_llamacpp(llama_simple, trained_tokenizer, tmp_path):
    """The q8_0 file (what the quantization benchmarks use) loads and generates; tokens may differ from fp32."""
    model = tiny_for_gguf(trained_tokenizer, seed=8)
    textlike(model, trained_tokenizer)
    export_gguf(model, tmp_path / "q.gguf", outtype="q8_0", tokenizer=trained_tokenizer)
    got = run_llama_simple(llama_simple, tmp_path / "q.gguf", "The quick brown fox", 8)
    assert got.startswith(b"<|begin_of_text|>The quick brown fox") and len(got) > len(b"<|begin_of_text|>The quick brown fox")


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_same_file_as_llamacpps_own_converter(outtype, trained_tokenizer, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py on our HF save (its pre-tokenizer check told ours is Llama 4's,
    as the export does) writes the same tensors, bytes and metadata as `convert --to gguf`."""
    import sys

    import gguf
    import numpy as np

    if not (LLAMACPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no llama.cpp sources at {LLAMACPP}")
    model = tiny_for_gguf(trained_tokenizer, seed=1)
    llama4.save(model, tmp_path / "hf", tokenizer=trained_tokenizer)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    convert = (f"import sys; sys.path[:0] = [{str(LLAMACPP)!r}, {str(LLAMACPP / 'gguf-py')!r}]\n"
               "import conversion.base as base\n"
               "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama4'\n"
               "import convert_hf_to_gguf\n"
               "sys.argv = ['convert_hf_to_gguf.py', *sys.argv[1:]]\n"
               "convert_hf_to_gguf.main()\n")
    r = subprocess.run([sys.executable, "-c", convert, str(tmp_path / "hf"), "--outtype", outtype, "--outfile",
                        str(theirs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["convert", str(tmp_path / "hf"), str(ours), "--to", "gguf", "--outtype", outtype]) == 0
    a, b = gguf.GGUFReader(str(theirs)), gguf.GGUFReader(str(ours))
    naming = {"general.name", "general.size_label", "GGUF.kv_count"}  # its directory name / size estimate
    fa = {k: f.contents() for k, f in a.fields.items() if k not in naming}
    fb = {k: f.contents() for k, f in b.fields.items() if k not in naming}
    assert fa == fb, sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert (t.tensor_type, list(t.shape)) == (tb[name].tensor_type, list(tb[name].shape)), name
        assert np.array_equal(t.data, tb[name].data), name

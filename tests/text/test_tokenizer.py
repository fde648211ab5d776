"""Tokenizer: id-for-id parity with llama_models' Llama 4 tokenizer, round trips, streaming, bad files,
and small trained tokenizers (tokenizer.json)."""

import random
import shutil

import pytest

import llama4
from llama4.cli import main as cli_main
from llama4.text.tokenizer import (_IS_SPACE, MAX_ENCODE_CHARS, MAX_RUN_CHARS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer,
                              _segments)
from llama4.text.bpe import train_tokenizer

ref_module = pytest.importorskip("llama_models.llama4.tokenizer")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def ref():
    return ref_module.Tokenizer.get_instance()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 400-token BPE trained here, loaded from its tokenizer.json."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz日本語é👍") for _ in range(rng.randrange(1, 9)))
             for _ in range(2000)]
    corpus.write_text(" ".join(rng.choice(words) for _ in range(20_000)), encoding="utf-8")
    out = tmp_path_factory.mktemp("small_tok")
    train_tokenizer([corpus], 400, out)
    return Tokenizer(out)


BROAD = [
    "", " ", "Hello, Llama 4 world!", "hello\nworld\n", "The year 2025: 1234567 items, 3.14159, -42.",
    "I'm here, you're there; they'll've it's", "ALLCAPS and MixedCase and camelCaseWords",
    "日本語のテキスト、中文，한국어", "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️", "é vs é (NFC vs NFD)", "العربية עברית हिन्दी ไทย",
    "def f(x):\n\treturn  x**2  # square\n\n\nclass A:\n    pass\n", "{\"json\": [1, 2, {\"k\": null}]}",
    "   leading and trailing   ", "\t\t\ttabs\r\n\r\nCRLF\n\n\n\n", " " * 100, "\n" * 50, "a\u00a0b\u2009c\u3000d",
    "\x00\x01\x02\x1b[31mred\x7f\x85", "\ufeffbom \u200bzero\u200dwidth", "<|eot|>", "<|begin_of_text|>hi<|end_of_text|>",
    "text<|header_start|>assistant<|header_end|>\n\nmore", "<|image|><|patch|><|patch|>", "<|not_a_token|> <|eot",
    "<|<|eot|>|>", "a" * 1000, "ab" * 3000, "1" * 500, "!!!???..." * 100, "https://example.com/a?b=c&d=e#f",
]


@pytest.mark.parametrize("text", BROAD)
def test_encode_matches_llama_models(tok, ref, text):
    assert tok.encode(text) == ref.encode(text, bos=False, eos=False)
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert tok.encode(text, allow_special=True) == ref.encode(text, bos=False, eos=False, allowed_special="all")
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, bos=False, eos=False)) == text


def test_special_tokens_and_reference_ids(tok, ref):
    assert tok.special_tokens == ref.special_tokens
    assert len(SPECIAL_TOKENS) == 2048 and tok.vocab_size == 202048
    table = {"<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|header_start|>": 200005,
             "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008, "<|finetune_right_pad|>": 200018,
             "<|python_start|>": 200016, "<|image_start|>": 200080, "<|image_end|>": 200081,
             "<|tile_x_separator|>": 200084, "<|tile_y_separator|>": 200085, "<|image|>": 200090, "<|patch|>": 200092}
    assert {s: tok.special_tokens[s] for s in table} == table
    assert tok.stop_ids == [200001, 200007, 200008] and tok.pad_id == 200018
    assert tok.encode("Hello, Llama 4 world!", bos=True) == [200000, 19873, 24, 432, 44872, 220, 32, 3817, 13]
    assert llama4.Tokenizer is Tokenizer


def test_allow_some_special_tokens(tok, ref):
    text = "a<|eot|>b<|eom|>c<|image|>"
    assert tok.encode(text, allow_special={"<|eot|>"}) == ref.encode(text, bos=False, eos=False,
                                                                      allowed_special={"<|eot|>"})
    assert tok.encode(text, allow_special=["<|eot|>", "<|image|>"]).count(tok.special_tokens["<|image|>"]) == 1
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allow_special={"<|nope|>"})


def _random_unicode(rng, n):
    """Random code points from every plane, surrogates excluded (they are not valid in UTF-8)."""
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000), rng.randrange(0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


def test_roundtrip_random_unicode(tok, ref):
    rng = random.Random(0)
    for n in [1, 2, 5, 17, 100, 1000, 5000]:
        text = _random_unicode(rng, n)
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == ref.encode(text, bos=False, eos=False)


def _ref_segments(text):
    """The pieces llama_models' Tokenizer.encode hands to tiktoken, one by one."""
    return [s for i in range(0, len(text), MAX_ENCODE_CHARS)
            for s in ref_module.Tokenizer._split_whitespaces_or_nonwhitespaces(text[i:i + MAX_ENCODE_CHARS],
                                                                              MAX_RUN_CHARS)]


@pytest.mark.parametrize("text", [
    "", "a", "x" * MAX_RUN_CHARS, "x" * (MAX_RUN_CHARS + 1), " " * (2 * MAX_RUN_CHARS + 1), "ab " * 10,
    "y" * 60_000 + " " * 30_000 + "z" * 25_001 + "\n" * 3, " \u3000" * 20_000 + "\u00a0" * 30_000,
    "word " * 100_000, "q" * (MAX_ENCODE_CHARS + 10), ("a" * 30_000 + " ") * 20,
])
def test_segments_cut_where_llama_models_cuts(text):
    assert _segments(text) == _ref_segments(text)


def test_whitespace_table_is_str_isspace():
    assert not any(chr(c).isspace() for c in range(len(_IS_SPACE) - 1, 0x110000))
    assert [bool(x) for x in _IS_SPACE[:-1]] == [chr(c).isspace() for c in range(len(_IS_SPACE) - 1)]


def test_lone_surrogates_encode_like_llama_models(tok, ref):
    text = "a\ud800b \udfff" + "x" * (MAX_RUN_CHARS + 5)
    assert _segments(text) == _ref_segments(text)
    assert tok.encode(text) == ref.encode(text, bos=False, eos=False)


def test_long_inputs_match_llama_models(tok, ref):
    rng = random.Random(1)
    words = ["the", "Llama", "模型", "👍🏽", "def", "\n", "  ", "12345", "ünïcödé", "\t"]
    prose = " ".join(rng.choice(words) for _ in range(150_000))  # ~1 MB, so several 400k-char pieces
    for text in [prose, "x" * 70_000 + " " * 60_000 + prose[:100_000], "ab" * 250_000]:
        assert len(text) > 100_000
        assert tok.encode(text) == ref.encode(text, bos=False, eos=False)
    assert tok.decode(tok.encode(prose)) == prose


def test_stream_emits_whole_characters(tok):
    text = "Streaming 日本語 and emoji 👩‍👩‍👧‍👦🏳️‍🌈 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀𓀁 ok"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # some token did end inside a character, and was held back
    assert all("\ufffd" not in p for p in pieces)
    # Bytes that can never complete a character still come out, as decode() shows them.
    stream = tok.stream()
    bad = tok.encode("日")[:1]
    assert stream.push(bad) + stream.push(tok.encode("a")) + stream.flush() == tok.decode(bad + tok.encode("a"))


def test_decode_special_and_bad_ids(tok):
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eot_id]) == "<|begin_of_text|>hi<|eot|>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([1, 202048])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")


def test_default_file_needs_llama_models(monkeypatch):
    import importlib.resources

    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", no_package)
    with pytest.raises(FileNotFoundError, match="pip install llama-models"):
        Tokenizer()


def test_load_from_directory_and_bad_files(tmp_path, tok):
    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    assert Tokenizer(tmp_path).encode("Hello") == tok.encode("Hello")
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        Tokenizer(tmp_path / "empty_dir")

    corrupt = tmp_path / "corrupt.model"
    lines = tok.path.read_text().splitlines()
    corrupt.write_text("\n".join(lines[:300] + ["not base64 at all!"] + lines[300:400]))
    with pytest.raises(ValueError, match="line 301"):
        Tokenizer(corrupt)
    corrupt.write_text("\n".join(lines[:200] + lines[201:400]))  # a rank missing
    with pytest.raises(ValueError, match="ranks are not"):
        Tokenizer(corrupt)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    with pytest.raises(ValueError, match="corrupt.model"):
        Tokenizer(corrupt)
    corrupt.write_text("")
    with pytest.raises(ValueError, match="byte"):
        Tokenizer(corrupt)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable Hugging Face tokenizer.json"):
        Tokenizer(bad_json)


def test_small_trained_tokenizer(small):
    assert small.vocab_size == 400 + 2048
    assert list(small.special_tokens) == SPECIAL_TOKENS
    assert [small.special_tokens[s] for s in SPECIAL_TOKENS] == list(range(400, 2448))
    rng = random.Random(2)
    for text in BROAD + [_random_unicode(rng, 300)]:
        ids = small.encode(text)
        assert small.decode(ids) == text
        assert max(ids, default=0) < 400  # special-token strings in text stay plain text
    assert small.encode("a<|eot|>b", allow_special=True)[1] == small.eot_id == 400 + 8
    ids = small.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:2] == [small.bos_id, small.special_tokens["<|header_start|>"]]
    stream = small.stream()
    text = "日本語 👍🏽"
    assert "".join(stream.push(i) for i in small.encode(text)) + stream.flush() == text


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to learn from, some more text\n" * 20)
    assert cli_main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out",
                     str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "2,048 special" in out and "ran out of pairs" in out  # this corpus is too small for 300
    trained = Tokenizer(tmp_path / "tok")
    assert 256 < trained.bos_id == trained.vocab_size - 2048 < 300
    assert cli_main(["tokenizer", "train", "--corpus", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                     "--out", str(tmp_path / "x")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert cli_main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "100", "--out",
                     str(tmp_path / "x")]) == 2
    assert "below 256" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_tokenizer_json_matches_tokenizer_model(tmp_path, tok):
    """A checkpoint's tokenizer.json (converted from tokenizer.model as transformers converts Llama 4's)
    gives the same ids through the `tokenizers` backend as Meta's file through tiktoken."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(tok.path), pattern=SPLIT_PATTERN, extra_special_tokens=SPECIAL_TOKENS)
    converter.converted().save(str(tmp_path / "tokenizer.json"))
    hf = Tokenizer(tmp_path)
    assert hf.path.name == "tokenizer.json" and hf.special_tokens == tok.special_tokens
    rng = random.Random(4)
    for text in BROAD + [_random_unicode(rng, 3000), "word " * 100_000 + "y" * 60_000]:
        ids = hf.encode(text)
        assert ids == tok.encode(text) and hf.decode(ids) == tok.decode(ids)
        assert hf.encode(text, allow_special=True) == tok.encode(text, allow_special=True)

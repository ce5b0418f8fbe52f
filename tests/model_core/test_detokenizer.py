"""The incremental detokenizer streams exactly what decode() gives, holding back partial characters."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_core.tokenizer import Tokenizer
from tests.model_core.tokenizer_cases import (
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


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def missing(hf) -> frozenset[int]:
    return missing_bytes(hf)


@pytest.mark.parametrize("text", ["🏳️‍🌈 family 👨‍👩‍👧‍👦!", "中文文本和日本語のテキスト", "naïve 😀😀 ½ ٣"])
def test_incremental_holds_back_partial_characters(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    pieces = stream(ours, ids)
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
def test_incremental_property_on_text(ours: Tokenizer, missing: frozenset[int], text: str) -> None:
    ids = ours.encode(text)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    # (a special token's text, e.g. "<|endoftext|>", which Hypothesis draws from the code's constants, encodes to that
    # token, and decoding skips it)
    specials = [ours.token_bytes(i).decode("utf-8", "replace") for i in ours.special_token_ids]
    if representable(text, missing) and not any(s in text for s in specials):
        assert "".join(pieces) == text
        if "\ufffd" not in text:
            assert all("\ufffd" not in p for p in pieces)


@HYP
@given(data=st.data(), skip=st.booleans())
def test_incremental_property_on_arbitrary_ids(ours: Tokenizer, hf, data, skip: bool) -> None:
    """Any id sequence, including broken byte sequences and special tokens, streams to decode()."""
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1) | st.integers(0, 300), max_size=25))
    want = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(ours, ids, skip)) == ours.decode(ids, skip) == want


def test_generic_decoder_streams_like_decode(tmp_path: Path) -> None:
    ours = Tokenizer.from_pretrained_dir(write_tiny_dir(tmp_path / "sp", normalizer=True))
    assert ours.mode == "generic"
    for text in TINY_TEXT:
        ids = ours.encode(text)
        pieces = stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids)
        assert all("\ufffd" not in p for p in pieces)

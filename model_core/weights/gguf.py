"""Load a GGUF file's weights: hyper-parameters from its metadata, dequantized tensors (via the `gguf`
package), and the blocks of the quantized linear layers. The file is opened by `gguf_reader`.

Supported tensor types are those `gguf.quants.dequantize` handles: F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1 and the K-quants (Q2_K..Q6_K).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from model_core.lm import ARCHITECTURES, LMConfig
from model_core.qmatmul import BLOCK_BYTES, QuantWeight
from model_core.weights.gguf_reader import GGUFFile, open_gguf

log = logging.getLogger(__name__)


def config_from_metadata(meta: dict[str, Any]) -> LMConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks '{arch}.{name}'")
        return v

    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported; only plain RoPE is")
    n_heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError("GGUF metadata has neither a vocab size nor tokenizer tokens")
    eps_key = "attention.layer_norm_rms_epsilon" if arch == "llama" else "attention.layer_norm_epsilon"
    d_model = int(key("embedding_length"))
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    return LMConfig(
        arch=arch,
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
        d_ff=int(key("feed_forward_length")),
        max_seq_len=int(key("context_length")),
        norm_eps=float(key(eps_key, 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        head_dim=int(head_dim) if head_dim and int(head_dim) != d_model // n_heads else None,
        tie_embeddings="output.weight" not in meta.get("_tensor_names", ()),
    )


def dequantize_tensor(t: Any) -> torch.Tensor:
    """A `gguf.ReaderTensor` -> float32 torch tensor in PyTorch's (rows, cols) order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 (innermost) first
    qtype = t.tensor_type
    if qtype == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif qtype == GGMLQuantizationType.F16:
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        try:
            arr = dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise ValueError(f"tensor {t.name!r}: GGUF type {qtype.name} is not supported") from e
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))


def load_gguf(
    path: str | os.PathLike[str], file: GGUFFile | None = None
) -> tuple[LMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (config, tensors by our names as float32, metadata); `file`: `path` already opened."""
    from tqdm import tqdm

    from model_core.weights.names import NAME_MAPS

    file = file or open_gguf(path)
    meta = dict(file.metadata)
    meta["_tensor_names"] = file.tensor_names
    cfg = config_from_metadata(meta)
    raw = {
        t.name: dequantize_tensor(t)
        for t in tqdm(file.tensors, desc="dequantizing", unit="tensor", leave=False, disable=None)
    }
    sd = NAME_MAPS[("gguf", cfg.arch)](raw, cfg)
    return cfg, sd, meta


def load_gguf_blocks(
    path: str | os.PathLike[str], cfg: LMConfig, file: GGUFFile | None = None
) -> dict[str, QuantWeight]:
    """The linear layers whose GGUF tensors are in a type the quantized kernel runs (Q4_0, Q4_1, Q8_0),
    repacked in our row order, keyed by module path. Layers in other types are left out."""
    from model_core.weights.names import gguf_linear_sources, unpermute_rope_rows

    tensors = {t.name: t for t in (file or open_gguf(path)).tensors}
    out: dict[str, QuantWeight] = {}
    for module, parts in gguf_linear_sources(cfg, set(tensors)).items():
        if any(name not in tensors for name, _ in parts):
            continue
        qtypes = {int(tensors[name].tensor_type) for name, _ in parts}
        if len(qtypes) != 1 or (qtype := qtypes.pop()) not in BLOCK_BYTES:
            continue
        rows = []
        for name, heads in parts:
            raw = torch.from_numpy(np.array(tensors[name].data))  # (rows, row bytes) uint8
            if heads is not None:
                raw = raw[unpermute_rope_rows(torch.arange(raw.shape[0]), heads)]
            rows.append(raw)
        out[module] = QuantWeight.from_ggml(qtype, torch.cat(rows) if len(rows) > 1 else rows[0])
    return out

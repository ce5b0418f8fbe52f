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

from model_core import models
from model_core.lm import LMConfig
from model_core.qmatmul import GGML_TYPES, QuantWeight
from model_core.weights.gguf_reader import GGUFFile, open_gguf
from model_core.weights.names import GGUF_EMBED, Layout, linear_sources, state_dict_from_layout, unpermute_rope_rows

log = logging.getLogger(__name__)

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3 rope scaling, one divisor per rotary frequency


def config_from_metadata(meta: dict[str, Any]) -> LMConfig:
    """The config of a GGUF file's model, by its family (model_core.models); meta may carry "_tensor_names" (the
    file's tensors: whether the LM head is tied) and "_rope_freqs" (its rope_freqs tensor, Llama 3's scaling)."""
    return models.for_gguf(meta.get("general.architecture")).from_gguf(meta)


def gguf_layout(cfg: LMConfig) -> Layout:
    return models.family(cfg.arch).gguf_layout(cfg)


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
    path: str | os.PathLike[str], file: GGUFFile | None = None, skip_quantized: bool = False
) -> tuple[LMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (config, tensors by our names as float32, metadata); `file`: `path` already opened. skip_quantized: the
    linear layers' tensors that load_gguf_blocks reads (those the kernels run as stored) and the token embedding where
    embedding_blocks reads it are not dequantized: their entries are float32 tensors on the meta device (shapes
    only)."""
    from tqdm import tqdm

    file = file or open_gguf(path)
    cfg, meta = _file_config(file)
    skip = (_quantized_tensor_names(cfg, file) | {GGUF_EMBED}) if skip_quantized else set()
    if _embedding_tensor(file) is None:
        skip.discard(GGUF_EMBED)
    raw = {
        t.name: _shape_only(t) if t.name in skip else dequantize_tensor(t)
        for t in tqdm(file.tensors, desc="dequantizing", unit="tensor", leave=False, disable=None)
        if t.name != ROPE_FREQS
    }
    return cfg, state_dict_from_layout(raw, gguf_layout(cfg)), meta


def _file_config(file: GGUFFile) -> tuple[LMConfig, dict[str, Any]]:
    """The file's config and its metadata (with "_tensor_names" and, for Llama 3's rope scaling, "_rope_freqs")."""
    meta = dict(file.metadata)
    meta["_tensor_names"] = file.tensor_names
    freqs = next((t for t in file.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # Llama 3's rope scaling, a divisor per frequency: part of the config
        meta["_rope_freqs"] = tuple(float(f) for f in dequantize_tensor(freqs).reshape(-1))
    return config_from_metadata(meta), meta


def _shape_only(t: Any) -> torch.Tensor:
    """A `gguf.ReaderTensor`'s float32 (rows, cols) shape on the meta device."""
    return torch.empty(tuple(int(d) for d in reversed(t.shape)), dtype=torch.float32, device="meta")


def _quantized_sources(cfg: LMConfig, file: GGUFFile) -> dict[str, list[tuple[str, int | None]]]:
    """The linear layers (module paths) whose GGUF tensors are all of types the kernels run (GGML_TYPES) in whole
    blocks per row, with their tensors (as linear_sources)."""
    tensors = {t.name: t for t in file.tensors}
    out = {}
    for module, parts in linear_sources(gguf_layout(cfg), set(tensors)).items():
        if all(name in tensors and _whole_blocks(tensors[name]) for name, _ in parts):
            out[module] = parts  # (else dense only: another type, or F16/BF16 rows of K not a multiple of 32)
    return out


def _whole_blocks(t: Any) -> bool:
    """A tensor of a type the kernels run (GGML_TYPES), each row whole blocks of it."""
    qtype = GGML_TYPES.get(int(t.tensor_type))
    return qtype is not None and int(t.data.nbytes // t.data.shape[0]) % qtype.nbytes == 0


def _embedding_tensor(file: GGUFFile) -> Any:
    """The token embedding's tensor where its type is one the kernels run, else None."""
    t = next((t for t in file.tensors if t.name == GGUF_EMBED), None)
    return t if t is not None and _whole_blocks(t) else None


def embedding_blocks(file: GGUFFile) -> QuantWeight | None:
    """The token embedding as stored (model_core.quant_embedding), where its type is one the kernels run; else None."""
    t = _embedding_tensor(file)
    if t is None:
        return None
    raw = torch.from_numpy(np.array(t.data)).view(torch.uint8)  # (rows, row bytes)
    return QuantWeight.from_ggml(int(t.tensor_type), raw)


def _quantized_tensor_names(cfg: LMConfig, file: GGUFFile) -> set[str]:
    return {name for parts in _quantized_sources(cfg, file).values() for name, _ in parts}


def quantized_linear_weights(file: GGUFFile) -> int:
    """How many weights the linear layers that run on their quantized weights hold (the dense copies load_gguf makes
    of them unless skip_quantized; the token embedding aside)."""
    names = _quantized_tensor_names(_file_config(file)[0], file) - {GGUF_EMBED}
    return sum(int(np.prod([int(d) for d in t.shape])) for t in file.tensors if t.name in names)


def load_gguf_blocks(
    path: str | os.PathLike[str], cfg: LMConfig, file: GGUFFile | None = None
) -> dict[str, QuantWeight | tuple[QuantWeight, ...]]:
    """The linear layers whose GGUF tensors are all in types the quantized kernels run (model_core.qmatmul.GGML_TYPES),
    repacked in our row order, keyed by module path: one weight where the layer's tensors are of one type, else its
    parts stacked by rows, one per run of tensors of one type (a Q4_K_M file's QKV: q, k in Q4_K, v in Q6_K: two
    parts), each as stored. Layers with a tensor of another type are left out."""
    file = file or open_gguf(path)
    tensors = {t.name: t for t in file.tensors}
    out: dict[str, QuantWeight | tuple[QuantWeight, ...]] = {}
    for module, parts in _quantized_sources(cfg, file).items():
        runs: list[tuple[int, list[torch.Tensor]]] = []  # (type, its tensors' rows), in the layer's order
        for name, heads in parts:
            raw = torch.from_numpy(np.array(tensors[name].data)).view(torch.uint8)  # (rows, row bytes): F16 arrays too
            if heads is not None:
                raw = raw[unpermute_rope_rows(torch.arange(raw.shape[0]), heads)]
            qtype = int(tensors[name].tensor_type)
            if runs and runs[-1][0] == qtype:
                runs[-1][1].append(raw)
            else:
                runs.append((qtype, [raw]))
        weights = tuple(QuantWeight.from_ggml(qt, torch.cat(rows) if len(rows) > 1 else rows[0]) for qt, rows in runs)
        out[module] = weights[0] if len(weights) == 1 else weights
    return out

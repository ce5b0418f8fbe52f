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
from model_core.qmatmul import GGML_TYPES, Q4_0, Q5_0, Q8_0, QuantWeight
from model_core.weights.gguf_reader import GGUFFile, open_gguf
from model_core.weights.names import Layout, linear_sources, state_dict_from_layout, unpermute_rope_rows

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
    path: str | os.PathLike[str], file: GGUFFile | None = None
) -> tuple[LMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (config, tensors by our names as float32, metadata); `file`: `path` already opened."""
    from tqdm import tqdm

    file = file or open_gguf(path)
    meta = dict(file.metadata)
    meta["_tensor_names"] = file.tensor_names
    freqs = next((t for t in file.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # Llama 3's rope scaling, a divisor per frequency: part of the config
        meta["_rope_freqs"] = tuple(float(f) for f in dequantize_tensor(freqs).reshape(-1))
    cfg = config_from_metadata(meta)
    raw = {
        t.name: dequantize_tensor(t)
        for t in tqdm(file.tensors, desc="dequantizing", unit="tensor", leave=False, disable=None)
        if t.name != ROPE_FREQS
    }
    return cfg, state_dict_from_layout(raw, gguf_layout(cfg)), meta


_AS_Q8_0 = {Q4_0: 18, Q5_0: 22, Q8_0: 34}  # the types whose weights Q8_0 holds exactly (d (q - 8), d (q - 16)): bytes


def _as_q8_0(qtype: int, raw: torch.Tensor) -> torch.Tensor:
    """(rows, row bytes) GGML blocks of Q4_0, Q5_0 or Q8_0 -> the same weights as Q8_0 blocks, exactly: a block's
    w = d (q - 8) (Q4_0) or d (q - 16) (Q5_0, q of 5 bits) is d q' with q' = q - 8 or q - 16, an int8."""
    if qtype == Q8_0:
        return raw
    n = raw.shape[0]
    b = raw.reshape(n, -1, _AS_Q8_0[qtype]).numpy()
    d = b[:, :, :2]
    nib = b[:, :, -16:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.int16)  # weight i < 16: low nibble of byte i
    if qtype == Q5_0:
        qh = b[:, :, 2:6].copy().view("<u4")  # (n, nb, 1): bit i the fifth bit of weight i
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)
        q -= 16
    else:
        q -= 8
    out = np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out.reshape(n, -1)))


def load_gguf_blocks(
    path: str | os.PathLike[str], cfg: LMConfig, file: GGUFFile | None = None
) -> dict[str, QuantWeight]:
    """The linear layers whose GGUF tensors are in a type the quantized kernels run (model_core.qmatmul.GGML_TYPES),
    all parts of a layer in the same one, repacked in our row order, keyed by module
    path; parts mixing Q4_0, Q5_0 and Q8_0 (a Q4_K_M file's q, k in Q5_0 and v in Q8_0) all as Q8_0 blocks, which
    hold their weights exactly. Layers in other types, or whose parts mix other types, are left out."""
    tensors = {t.name: t for t in (file or open_gguf(path)).tensors}
    out: dict[str, QuantWeight] = {}
    for module, parts in linear_sources(gguf_layout(cfg), set(tensors)).items():
        if any(name not in tensors for name, _ in parts):
            continue
        qtypes = {int(tensors[name].tensor_type) for name, _ in parts}
        widen = len(qtypes) > 1 and qtypes <= set(_AS_Q8_0)  # e.g. Q4_K_M's q, k in Q5_0 beside v in Q8_0
        if widen:
            qtypes = {Q8_0}
        if len(qtypes) != 1 or (qtype := qtypes.pop()) not in GGML_TYPES:
            continue
        if any(
            int(tensors[name].data.nbytes // tensors[name].data.shape[0])
            % GGML_TYPES[int(tensors[name].tensor_type)].nbytes
            for name, _ in parts
        ):
            continue  # F16/BF16 rows of K not a multiple of 32: dense only
        rows = []
        for name, heads in parts:
            raw = torch.from_numpy(np.array(tensors[name].data)).view(torch.uint8)  # (rows, row bytes): F16 arrays too
            if widen:
                raw = _as_q8_0(int(tensors[name].tensor_type), raw)
            if heads is not None:
                raw = raw[unpermute_rope_rows(torch.arange(raw.shape[0]), heads)]
            rows.append(raw)
        out[module] = QuantWeight.from_ggml(qtype, torch.cat(rows) if len(rows) > 1 else rows[0])
    return out

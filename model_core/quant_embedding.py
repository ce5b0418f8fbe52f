"""An embedding table kept as its GGUF blocks (a model loaded without dense weights: model_core.weights.loader's
dense_weights): a lookup dequantizes the rows it reads by the model's kernels, the values a dense table of the same
dtype holds (gguf's, rounded to the dtype), at about the file's size instead of the table's in bf16 or fp32 (an
8B model's 128256 x 4096 table: 1 GiB in bf16, 280 MB in Q4_K)."""

from __future__ import annotations

import torch
from torch import nn

from model_core.native import Kernels
from model_core.qmatmul import ACT, QuantWeight, dequantize_into


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup on a quantized (num_embeddings, embedding_dim) weight, in row form or interleaved (the
    tied LM head's own copy), with outputs in `dtype` (float32 or bfloat16)."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        if dtype not in ACT:
            raise ValueError(f"a quantized embedding gives float32 or bfloat16 rows, not {dtype}")
        self.quant, self.dtype, self.kernels = weight, dtype, kernels
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()  # (n,)
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=self.dtype)
        if flat.numel():
            dequantize_into(self.quant.take_rows(flat), out, self.kernels)
        return out.view(*ids.shape, self.embedding_dim)

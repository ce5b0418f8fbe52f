"""One entry point: a path (GGUF file or Hugging Face directory) -> model, tokenizer and config."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from model_core.backend import TORCH, DecodeBackend, select_backend
from model_core.device import select_device, select_dtype
from model_core.fused_decode import FusedLlamaDecoder
from model_core.lm import CausalLM, LMConfig
from model_core.packing import pack_linears, packing_available
from model_core.qmatmul import ALL_ROWS, FLOAT_KINDS, GGML_TYPES, QuantLinear, attach_quantized
from model_core.quant_embedding import QuantEmbedding
from model_core.tokenizer import Tokenizer
from model_core.weights.build import build_lm
from model_core.weights.gguf_reader import GGUFFile

log = logging.getLogger(__name__)

_KERNEL_TYPES = "/".join(t.name for t in GGML_TYPES.values())  # the tensor types the native kernels read


@dataclass
class LoadedLM:
    model: CausalLM
    tokenizer: Tokenizer
    config: LMConfig
    path: str
    name: str
    load_seconds: float
    backend: DecodeBackend  # what runs decode steps; give its kernels to the KV cache

    @property
    def batch_invariant(self) -> bool:
        """Whether each token's logits are the same in any batch (model_core.lm: batch-invariant mode)."""
        return self.model.batch_invariant

    @property
    def products(self) -> str:
        """How the quantized layers multiply: 'int8 activations' or '16-bit activations' (integer products), or
        'exact products'; '' without native kernels."""
        if self.backend.kernels is None:
            return ""
        parts = [w for m in self.model.modules() if isinstance(m, QuantLinear) for w in m.parts if w.interleaved]
        if not parts:
            return "exact products"
        return "int8 activations" if parts[0].x_bits == 8 else f"{parts[0].x_bits}-bit activations"


def invariance_gap(model: CausalLM) -> str | None:
    """Why the batch-invariant mode cannot hold for this model as loaded, or None where it does: every layer
    through the fused decoder in one call at any batch, the lm_head on its kernel at any batch."""
    fast = model.decoder_fast_path
    if not isinstance(fast, FusedLlamaDecoder):
        return "the fused native decoder does not run this model (it runs float32/bf16 llama models on the CPU)"
    if fast.max_rows < ALL_ROWS:
        return f"not every projection runs on its quantized weights at any batch size (GGUF {_KERNEL_TYPES} only)"
    head = model.lm_head
    if not isinstance(head, QuantLinear) or head.max_rows < ALL_ROWS:
        return f"the output projection is not a GGUF {_KERNEL_TYPES} tensor run on its kernel"
    return None


def load_lm(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pack: bool = True,
    quantized_max_rows: int | None = 0,
    native_decode: bool = True,
    backend: DecodeBackend = TORCH,
    batch_invariant: bool | None = False,
    dense_weights: bool | None = True,
) -> LoadedLM:
    """pack: on CPUs that run oneDNN's bf16 matmuls, pre-pack bf16 linear weights (same results, faster).
    backend: what runs decode steps (model_core.backend.select_backend); with native kernels:
    quantized_max_rows: for a GGUF file, keep its weights of a type the kernels read (qmatmul.GGML_TYPES) quantized as
    well and run matmuls of up to this many rows (decode steps) on them (0 = off, None = the backend's default; see
    model_core.qmatmul);
    native_decode: run decode steps of llama models with native kernels between the matmuls
    (model_core.fused_decode); batch_invariant: every matmul on its kernel at any batch size, prompt chunks
    included (quantized_max_rows None then means all rows), and `model.batch_invariant` set where that makes each
    token's logits independent of its batch (model_core.lm); a warning says why where it does not; None: True for a
    GGUF file without F16/BF16 weights (the server's default: theirs have no integer form, and would run every
    prompt on their vector path), else False.
    dense_weights: for a GGUF file whose linear layers run on their quantized weights, also keep dense copies of them
    (dequantized at load; prompt chunks and batches above quantized_max_rows run on them, packed for oneDNN where it
    applies); False: only the quantized weights (those batches dequantize each layer's weights into a scratch buffer
    for the call: the same products, about a quarter of the memory); None: True where the dense copies take at most
    DENSE_MAX_BYTES and a quarter of the memory available (DENSE_SHARE), else False."""
    from model_core.weights.gguf import embedding_blocks, load_gguf, load_gguf_blocks
    from model_core.weights.gguf_reader import open_gguf
    from model_core.weights.safetensors import load_safetensors_dir

    t0 = time.perf_counter()
    p = Path(path)
    file = open_gguf(p) if p.is_file() else None  # read by both the dense and the quantized loaders
    kernels = backend.kernels if torch.device(device).type == "cpu" else None
    if kernels is None:
        backend = TORCH
    max_rows = backend.quant_max_rows if quantized_max_rows is None else quantized_max_rows
    asked = batch_invariant is not None  # (None: on where it pays, and quietly off elsewhere)
    if batch_invariant is None:
        floats = _float_weights(file) if file is not None else ["safetensors"]
        batch_invariant = not floats
        if floats and file is not None:
            why = "no integer form; --batch-invariant forces it"
            log.info("batch-invariant mode off by default for %s weights (%s)", "/".join(floats), why)
    if batch_invariant and quantized_max_rows is None and kernels is not None:
        max_rows = ALL_ROWS
    if p.is_dir():
        cfg, sd, _ = load_safetensors_dir(p)
        tok = Tokenizer.from_pretrained_dir(p)
        name = p.name
    elif file is not None:
        lean = kernels is not None and max_rows > 0 and not _keep_dense(dense_weights, file, dtype, pack)
        cfg, sd, meta = load_gguf(p, file, skip_quantized=lean)
        if lean:
            log.info("dense weights off: linear layers keep only their quantized weights")
            if quantized_max_rows is None and max_rows < ALL_ROWS:
                max_rows = backend.lean_max_rows
        tok = Tokenizer.from_gguf(p, meta)
        name = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
    else:
        raise FileNotFoundError(f"model path {str(p)!r} does not exist")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    n_params = sum(t.numel() for name, t in sd.items() if name != "lm_head.weight" or not cfg.tie_embeddings)
    model = build_lm(cfg, sd, dtype=dtype, device=device)
    del sd  # (the checkpoint in float32: the model holds its own copy)
    if pack and packing_available(dtype, torch.device(device)):
        log.info("packed %d linear layers for oneDNN", pack_linears(model))
    if kernels is not None and max_rows > 0 and file is not None:
        # batch-invariant: integer products with activations rounded to 16 bits where the build has them (exact sums:
        # the same in every build and on AMX tiles at any batch size; int8 ones would cost prompts' accuracy)
        x_bits = 16 if batch_invariant and kernels.isa.has_int8 else None
        n = attach_quantized(model, load_gguf_blocks(p, cfg, file), max_rows, kernels, x_bits)
        log.info("%d linear layers also run on their quantized weights for up to %d rows", n, max_rows)
        if model.embed.weight.is_meta:  # (dense weights off, the embedding of a type the kernels run)
            head = model.lm_head
            if cfg.tie_embeddings and isinstance(head, QuantLinear) and len(head.parts) == 1:
                table = head.parts[0]  # (the tied head's copy: one table for both)
            else:
                table = embedding_blocks(file)
            assert table is not None
            model.embed = QuantEmbedding(table, dtype, kernels)
    model.kernels = kernels
    if kernels is not None and native_decode:
        model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
        if model.decoder_fast_path is not None:
            log.info(
                "decode steps run with native kernels between matmuls (one call per layer up to %d rows)",
                model.decoder_fast_path.max_rows,
            )
    if batch_invariant:
        gap = "no native kernels run this model (backend torch)" if kernels is None else invariance_gap(model)
        if gap is None:
            model.batch_invariant = True
            log.info("batch-invariant: every token's logits are the same in any batch, chunking or cache hit")
            floats = sorted({w.kind.name for m in model.modules() if isinstance(m, QuantLinear) for w in m.parts
                             if w.kind in FLOAT_KINDS})  # fmt: skip
            if floats:
                log.warning(
                    "batch-invariant with %s weights: they have no integer form, and their exact products run on the "
                    "vector path at every batch size (prompts several times slower than on the dense matmuls); "
                    "--no-batch-invariant for speed",
                    "/".join(floats),
                )
        else:
            (log.warning if asked else log.info)("batch-invariant mode off for this model: %s", gap)
    _release_freed_memory()
    dt = time.perf_counter() - t0
    log.info(
        "loaded %s: family %s, %s parameters, %d layers, d=%d, context %d, tensors %s; as %s on %s in %.1fs",
        name,
        cfg.arch,
        _count(n_params),
        cfg.n_layers,
        cfg.d_model,
        cfg.max_seq_len,
        _tensor_types(file) if file is not None else "safetensors",
        dtype,
        device,
        dt,
    )
    return LoadedLM(model, tok, cfg, str(p), name, dt, backend)


# dense_weights=None keeps dense copies that take at most DENSE_MAX_BYTES and this share of the available memory: a
# small model's (the default SmolLM2's: 540 MB) speed its prompts for little memory; a bigger one's would multiply
# what it takes (Qwen3-1.7B-shaped Q4_K_M: 7159 MiB resident with them, 1455 without; prompts 19-29% slower)
DENSE_SHARE = 0.25
DENSE_MAX_BYTES = 1 << 30


def _keep_dense(dense_weights: bool | None, file: GGUFFile, dtype: torch.dtype, pack: bool) -> bool:
    """dense_weights decided: None by the dense copies' size (twice over where oneDNN packs them) against the memory
    available now."""
    if dense_weights is not None:
        return dense_weights
    from model_core.weights.gguf import quantized_linear_weights

    copies = 2 if pack and packing_available(dtype, torch.device("cpu")) else 1
    need = quantized_linear_weights(file) * dtype.itemsize * copies
    keep = need <= min(DENSE_MAX_BYTES, DENSE_SHARE * available_memory())
    if not keep:
        log.info(
            "dense copies would take %.1f GiB (%d of each weight): only quantized weights kept", need / 2**30, copies
        )
    return keep


def _release_freed_memory() -> None:
    """Hand the load's freed transient buffers back to the OS (glibc keeps them in its arenas otherwise: the
    Qwen3-1.7B-shaped Q4_K_M with the avx2 build stayed at 2209 MiB resident after its load, 1301 after this)."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        pass


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _float_weights(file: GGUFFile) -> list[str]:
    """The F16/BF16 types among the file's matrices (weights the kernels multiply as stored, exact products only)."""
    names = {getattr(t.tensor_type, "name", str(t.tensor_type)) for t in file.tensors if len(t.shape) == 2}
    return sorted(names & {"F16", "BF16"})


def _tensor_types(file: GGUFFile) -> str:
    """The file's quantization mix, e.g. "Q4_K x113, Q6_K x12, F32 x61"."""
    kinds = Counter(getattr(t.tensor_type, "name", str(t.tensor_type)) for t in file.tensors)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def load_for_inference(
    path: str | os.PathLike[str],
    device: str = "auto",
    dtype: str = "auto",
    kernels: str = "auto",
    quantized_max_rows: int | None = None,
    batch_invariant: bool | None = False,
    dense_weights: bool | None = None,
) -> LoadedLM:
    """Device, then decode backend, then dtype (auto picks by what the backend computes fast), then the model;
    logs one line naming the backend, ISA, dtype and threads."""
    dev = select_device(device)
    backend = select_backend(kernels, dev)
    lm = load_lm(
        path,
        select_dtype(dtype, dev, backend),
        dev,
        quantized_max_rows=quantized_max_rows,
        backend=backend,
        batch_invariant=batch_invariant,
        dense_weights=dense_weights,
    )
    log.info("%s", lm.backend.describe(lm.model.dtype, torch.get_num_threads(), lm.products))
    return lm

"""Decode steps of a float32 or bfloat16 llama model with the work between matmuls done by native kernels.

A decode step runs ~20 small PyTorch ops per layer; at small batches their dispatch costs as much as
the layer's arithmetic. `FusedLlamaDecoder` replaces them with native calls (kernels/layer.c):
 - when all four projections of every layer are `QuantLinear`s (GGUF blocks of any kind the kernels run: Q4_0,
   Q4_1, Q8_0, the K-quants and the 5-bit kinds, mixed as a Q4_K_M file mixes them, within a projection too) in one
   matmul mode, and the batch is at most their `max_rows`, each layer is one call (norms, projections with the QKV
   bias, QK-norm, RoPE, cache write, attention from the paged cache, SwiGLU, residual adds), and all of them one
   call together;
 - otherwise each layer is its four projections (PyTorch, dense, with their biases) with four native calls
   between them: norm, QK-norm + rope + cache write + attention, residual add + next norm, SwiGLU. This form gives
   the one-call form's results bit for bit (the same kernels, in the same order; tests/model_core/test_lora.py).
 Rows that run LoRA adapters (model_core.lora) get their deltas on the projections' outputs: inside the one-call
 layer where the native kernels add them (lora_add, on the CPU), else by the projections' hooks in the second form
 (at any batch); the base rows of such a step are those of a step without adapters either way.
Llama blocks, and the llama variants among the families (model_core.models): Qwen 2's QKV biases, Qwen 3's
QK-norm (an RMSNorm over each query and key head before RoPE), and Gemma's blocks (GELU-tanh gate; Gemma 2 and 3:
norms after each sublayer, soft-capped scores, sliding windows; Gemma 3: QK-norm, the windowed layers' own rotary
base) run fused too.
It reads the model's parameters (norms, QK-norms, the QKV bias), quantized weights and rotary tables and the cache
in place, through the modules: the one-call layers all run in one call (llama_decode_layers) from a table of their
arguments, read from the modules once and checked at every step (each module dict's entry it was read through the
same object, each tensor at the same address; ~1 us a layer against ~10 to read it again: a step of a 135M model
6% faster), read again where anything moved; the other form reads them at each step. So a model moved, cast or
given new weights between steps decodes with what it holds then. The kernels' working memory is the cache's scratch
(model_core.kv_cache.Scratch: one set per runner, kept from step to step, grown for a bigger batch).
Prompt chunks keep the module path, except with a cache that serves them in place (the batch-invariant
mode, model_core.lm): then every real token of the forward is one row of these calls, whatever chunk it
belongs to. The kernels are the model's backend's (model_core.backend), for whatever ISA it chose.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import nn

from model_core import lora
from model_core.kv_cache import PagedKVCache
from model_core.lm import Block, CausalLM, LMConfig
from model_core.native import EVERY_BATCH, LAYER_ARGS, PROJECTION_PARTS, KernelError, Kernels
from model_core.norms import RMSNorm
from model_core.qmatmul import ACT, ALL_ROWS, QuantLinear
from model_core.step_attention import StepAttention

GATES = {"swiglu": 0, "geglu_tanh": 1}  # the gated FFN activations the kernels run (GATE_* of kernels/aigc_kernels.h)
# the LoRA columns of llama_decode_layers' table, in lora.native_block's order (slots, a, bt, ranks) then G
_LORA = [LAYER_ARGS.index(n) for n in ("lora_slots", "lora_a", "lora_bt", "lora_ranks", "lora_g")]


class _Layer:
    """One block as the kernels take it, read from the block's modules at each call (through their dicts: a
    module attribute costs a microsecond, and a step reads 30 layers' worth)."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.window = int(block.attn.window)  # the positions this layer attends to (0: all)
        attn_norm, ffn_norm = block.attn_norm, block.ffn_norm
        if not (
            isinstance(attn_norm, RMSNorm)
            and isinstance(ffn_norm, RMSNorm)
            and attn_norm.weight.dtype == ffn_norm.weight.dtype
            and attn_norm.weight.dtype in ACT
        ):
            raise ValueError("the fused decoder runs float32 or bf16 llama layers (RMSNorm)")
        if any(_bias(lin) is not None for lin in self.linears()[1:]):
            raise ValueError("the fused decoder runs llama projections (a bias on the QKV projection only)")
        q_norm, k_norm = block.attn.q_norm, block.attn.k_norm
        if (q_norm is None) != (k_norm is None) or not all(
            isinstance(n, RMSNorm) and n.eps == attn_norm.eps for n in (q_norm, k_norm) if n is not None
        ):
            raise ValueError("the fused decoder runs QK-norms as RMSNorms of the layer's epsilon, on both q and k")
        post = (block.post_attn_norm, block.post_ffn_norm)
        if (post[0] is None) != (post[1] is None) or not all(
            isinstance(n, RMSNorm) and n.eps == attn_norm.eps for n in post if n is not None
        ):
            raise ValueError("the fused decoder runs post-sublayer norms as RMSNorms of the layer's epsilon, both")
        # what refresh() derived from the projections and their quantized weights, valid while they are these
        # objects: the weights' addresses and kinds (llama_decode_layer's w and kinds), the mode, the one-call batch
        # limit
        self._seen: tuple[object, ...] = ()
        self._ptrs: ctypes.Array[ctypes.c_void_p] | None = None
        self._kinds: ctypes.Array[ctypes.c_int32] | None = None
        self._parts: ctypes.Array[ctypes.c_int32] | None = None
        self._i8 = 0
        self.one_call_rows = 0  # batches up to this many rows run as one call (0: not all four quantized)
        self.refresh()

    def linears(self) -> list[nn.Module]:
        mods = self.block._modules
        attn, ffn = mods["attn"]._modules, mods["ffn"]._modules  # type: ignore[union-attr]
        return [attn["qkv"], attn["out"], ffn["w_in"], ffn["w_out"]]  # type: ignore[list-item]

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        mods = self.block._modules
        attn_norm = mods["attn_norm"]._parameters["weight"]  # type: ignore[union-attr]
        ffn_norm = mods["ffn_norm"]._parameters["weight"]  # type: ignore[union-attr]
        assert attn_norm is not None and ffn_norm is not None
        return attn_norm, ffn_norm

    def post_norms(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The norms after the attention and FFN sublayers (Gemma 2, 3), or (None, None) where the block has none."""
        mods = self.block._modules
        post_attn, post_ffn = mods.get("post_attn_norm"), mods.get("post_ffn_norm")
        if post_attn is None or post_ffn is None:
            return None, None
        return post_attn._parameters["weight"], post_ffn._parameters["weight"]

    def qk_norms(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The QK-norm's weights (q_norm, k_norm), or (None, None) where the block has none (as it is now)."""
        attn = self.block._modules["attn"]._modules  # type: ignore[union-attr]
        q_norm, k_norm = attn.get("q_norm"), attn.get("k_norm")
        if q_norm is None or k_norm is None:  # (the module path norms both or neither)
            return None, None
        return q_norm._parameters["weight"], k_norm._parameters["weight"]

    def qkv_bias(self) -> torch.Tensor | None:
        """The QKV projection's bias as llama_decode_layer takes it (fp32, contiguous; a no-op view of an fp32 one),
        read now; None without one."""
        qkv = self.block._modules["attn"]._modules["qkv"]  # type: ignore[union-attr]
        if isinstance(qkv, QuantLinear):
            return qkv.qbias
        bias = _bias(qkv)  # type: ignore[arg-type]
        return None if bias is None else bias.detach().to(torch.float32).contiguous()

    def refresh(self) -> None:
        """Re-derive the weights' state where a projection or its quantized weight is another object than at the
        last call (a QuantWeight is frozen, its tensors stay where they are: model.to() does not move them)."""
        linears = self.linears()
        seen = (*linears, *(lin.__dict__.get("parts") for lin in linears))
        if len(seen) == len(self._seen) and all(a is b for a, b in zip(seen, self._seen)):
            return
        quant = [lin.parts for lin in linears if isinstance(lin, QuantLinear)]
        flat = [w for parts in quant for w in parts]
        if len(quant) == 4 and len({w.mode_bits() for w in flat if w.kind.int8}) > 1:
            raise ValueError("the fused decoder runs a layer's projections in one matmul mode")
        if len(quant) == 4 and all(len(parts) <= PROJECTION_PARTS for parts in quant):
            # llama_decode_layer's w: (qs, d, m) of each part of Wqkv, Wo, Wgate|up, Wdown in turn; kinds: their
            # QKIND_* (model_core.qmatmul.QuantKind.value); parts: each projection's parts' rows (NULL: one each)
            self._ptrs = (ctypes.c_void_p * (3 * len(flat)))(
                *[None if t is None else t.data_ptr() for w in flat for t in (w.qs, w.d, w.m)]
            )
            self._kinds = (ctypes.c_int32 * len(flat))(*[w.kind.value for w in flat])
            rows = [[w.out_features for w in parts] + [0] * (PROJECTION_PARTS - len(parts)) for parts in quant]
            split = len(flat) > 4
            self._parts = (ctypes.c_int32 * (4 * PROJECTION_PARTS))(*sum(rows, [])) if split else None
            self.one_call_rows = min(lin.max_rows for lin in linears if isinstance(lin, QuantLinear))
            # the mode: integer products where the weights are interleaved, on activations of their x_bits (float kinds
            # take exact products in any mode); one method at every batch where every batch runs here (batch-invariant)
            self._i8 = max(w.mode_bits() for w in flat) | (EVERY_BATCH if self.one_call_rows >= ALL_ROWS else 0)
        else:
            self._ptrs, self._kinds, self._parts, self._i8, self.one_call_rows = None, None, None, 0, 0
        self._seen = seen

    def watched(self) -> list[tuple[dict[str, object], str, object]]:
        """The module dicts' entries the layer's arguments are read through (container, name, the object there now):
        the sublayers, norms and projections, the norms' weights, the projections' quantized parts and the QKV
        projection's dense layer and bias."""
        out: list[tuple[dict[str, object], str, object]] = []

        def watch(container: dict[str, object], *names: str) -> None:
            out.extend((container, n, container.get(n)) for n in names)

        mods = self.block._modules
        watch(mods, "attn", "ffn", "attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm")  # type: ignore[arg-type]
        attn, ffn = mods["attn"]._modules, mods["ffn"]._modules  # type: ignore[union-attr]
        watch(attn, "qkv", "out", "q_norm", "k_norm")  # type: ignore[arg-type]
        watch(ffn, "w_in", "w_out")  # type: ignore[arg-type]
        for norm in (
            mods["attn_norm"],
            mods["ffn_norm"],
            mods.get("post_attn_norm"),
            mods.get("post_ffn_norm"),
            attn.get("q_norm"),
            attn.get("k_norm"),
        ):
            if norm is not None:
                watch(norm._parameters, "weight")  # type: ignore[arg-type]
        for lin in self.linears():
            watch(lin.__dict__, "parts")
        qkv = attn["qkv"]
        if isinstance(qkv, QuantLinear):
            watch(qkv._modules, "dense")  # type: ignore[arg-type]
            watch(qkv.dense._parameters, "bias")  # type: ignore[arg-type]
        return out

    def weights(
        self,
    ) -> tuple[ctypes.Array[ctypes.c_void_p], ctypes.Array[ctypes.c_int32], ctypes.Array[ctypes.c_int32] | None, int]:
        """llama_decode_layer's w (the addresses of the projections' quantized weights, part by part, as they are
        since the last refresh()), kinds (their QKIND_* values), parts (the rows of each projection's parts; None
        where each is one) and i8 (the matmuls' mode)."""
        if self._ptrs is None or self._kinds is None:
            raise ValueError("the layer's projections are not all quantized")
        return self._ptrs, self._kinds, self._parts, self._i8


def _bias(linear: nn.Module) -> torch.Tensor | None:
    """A projection's bias: an nn.Linear's or PackedLinear's, or a QuantLinear's dense layer's."""
    if isinstance(linear, QuantLinear):
        linear = linear.dense
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _LayerTable:
    """llama_decode_layers' table of every layer's own arguments (L, LAYER_ARGS) int64, read from the modules, and
    what it was read from: the module dicts' entries it went through (each the same object still) and the tensors
    whose addresses it holds (each still there). Valid while all are: a model moved, cast or given new modules,
    parameters or weights between steps is read again (a parameter's data replaced in place by model.to() moves
    its address). A QKV bias that is not fp32 is copied into an fp32 buffer of the table's at every step (so a bias
    changed in place is read too). Checking costs ~1 us a layer; reading them again ~10."""

    def __init__(
        self,
        table: torch.Tensor,
        rows: int,
        watched: list[tuple[dict[str, object], str, object]],
        addresses: list[tuple[torch.Tensor, int]],
        biases: list[tuple[torch.Tensor, torch.Tensor]],
        held: list[object],
        key: tuple[object, ...],
    ) -> None:
        self.table, self.rows = table, rows  # the batches up to `rows` rows run as one call
        self.watched, self.addresses, self.biases, self.held, self.key = watched, addresses, biases, held, key

    def valid(self, key: tuple[object, ...]) -> bool:
        if key != self.key:
            return False
        for container, name, obj in self.watched:
            if container.get(name) is not obj:
                return False
        for t, address in self.addresses:
            if t.data_ptr() != address:
                return False
        for src, dst in self.biases:  # (read at every step, as the modules would)
            dst.copy_(src.detach())
        return True


def unsupported(cfg: LMConfig) -> str | None:
    """What of the model's block options the kernels do not run (None: all of them): they run llama blocks (RoPE,
    RMSNorm, SwiGLU; any attention scale, soft-cap and per-layer window; model_core.models.llama: Llama 2 and 3,
    SmolLM, Mistral) with or without QKV biases (Qwen 2, 2.5) and QK-norm (Qwen 3), a GELU-tanh gate, norms after
    each sublayer and the windowed layers' own rotary base (Gemma 1, 2, 3); no other biases."""
    plain = LMConfig(arch=cfg.arch, vocab_size=1, d_model=1, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=1, max_seq_len=1)
    for option in ("norm", "positions", "out_bias", "ffn_bias"):
        if getattr(cfg, option) != getattr(plain, option):
            return f"{option}={getattr(cfg, option)!r}"
    if cfg.activation not in GATES:
        return f"activation={cfg.activation!r}"
    return None


class FusedLlamaDecoder:
    """For `CausalLM.decoder_fast_path`: `applies(step, cache)`, then `run(x, step, cache)`."""

    def __init__(self, model: CausalLM, kernels: Kernels) -> None:
        cfg = model.cfg
        gap = unsupported(cfg)
        if gap is not None or cfg.hd % 16 or model.dtype not in ACT:
            raise ValueError(
                f"the fused decoder runs float32 or bf16 llama blocks with a head size multiple of 16 ({gap})"
            )
        rotary = model.rotary
        assert rotary is not None
        self.cfg = cfg
        self.kernels = kernels
        self.final_norm = model.norm  # its weight's dtype and device are the model's (the activations')
        self.rotary = rotary  # its cos, sin buffers (L, hs) are read at each step (they follow the model's dtype)
        self.rotary_local = model.rotary_local  # the windowed layers' tables, where their base differs (Gemma 3)
        self.gate = GATES[cfg.activation]
        self.layers = [_Layer(block) for block in model.blocks]  # type: ignore[arg-type]
        self._table: _LayerTable | None = None  # the layers' arguments of the last one-call step

    @property
    def max_rows(self) -> int:
        """Batches the one-call layers serve (0: none), as the model's layers are now."""
        for layer in self.layers:
            layer.refresh()
        return min(layer.one_call_rows for layer in self.layers)

    @classmethod
    def build(cls, model: CausalLM, kernels: Kernels) -> FusedLlamaDecoder | None:
        """The fused decoder for `model`, or None where it does not apply (not a llama in float32 or bf16)."""
        try:
            return cls(model, kernels)
        except ValueError:
            return None

    def applies(self, step: StepAttention, cache: PagedKVCache) -> bool:
        """A step the cache serves in place, with the model (as it is now) on the CPU in float32 or bf16, the
        cache's dtype."""
        if not step.in_place:
            return False
        w = self.final_norm.weight
        return w.dtype in ACT and w.device.type == "cpu" and cache.kv.dtype == w.dtype

    def run(self, x: torch.Tensor, step: StepAttention, cache: PagedKVCache) -> torch.Tensor:
        """x: (B, T, C) embeddings of this forward's tokens (T = 1 for a decode step) at step.positions (B, T).
        Returns the last layer's output (B, T, C) (zeros at padding tokens)."""
        flat = step.real_tokens(x).contiguous()  # (N, C): the real tokens, updated in place layer by layer
        pos = step.real_tokens(step.positions.unsqueeze(-1)).squeeze(-1)  # (B, T, 1) -> (N, 1) -> (N,)
        try:
            out = self._run(flat, pos, step, cache)
        except KernelError as e:
            e.add_note(f"fused step of {flat.shape[0]} tokens in {x.shape[0]} sequences")
            raise
        return step.padded(out)  # (B, T, C)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final RMSNorm of x (..., C), the activations `run` returned, in one kernel call (as the layers'
        norms: the same rounding as the module, the sum of squares in the kernel's order): PyTorch's four ops
        would each start with their code and data out of the caches the step's weights went through."""
        w, eps = self.final_norm.weight, float(self.final_norm.eps)  # type: ignore[arg-type]
        assert isinstance(w, torch.Tensor)
        if x.dtype != w.dtype or x.shape[-1] != w.shape[0]:
            raise ValueError(f"final norm of {x.dtype} (..., {x.shape[-1]}) activations, weight {w.dtype} {w.shape}")
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, C)
        out = torch.empty_like(rows)
        self.kernels.call(
            "llama_rmsnorm",
            rows.data_ptr(),
            w.data_ptr(),
            eps,
            out.data_ptr(),
            rows.shape[0],
            rows.shape[1],
            ACT[x.dtype],
        )
        return out.view(x.shape)

    def _run(self, x: torch.Tensor, pos: torch.Tensor, step: StepAttention, cache: PagedKVCache) -> torch.Tensor:
        """x: (N, C) rows, one per token, each at its position pos (N,): the step's query rows."""
        call, cfg, scratch = self.kernels.call, self.cfg, cache.scratch
        B, C, F = x.shape[0], cfg.d_model, cfg.d_ff
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        if x.dtype not in ACT or x.dtype != cache.kv.dtype:
            raise ValueError(f"fused decode of {x.dtype} activations with a {cache.kv.dtype} cache")
        act = ACT[x.dtype]
        tables = [(self.rotary, "")] + ([(self.rotary_local, "local.")] if self.rotary_local is not None else [])
        rope: dict[bool, tuple[int, int]] = {}  # windowed layer -> its (cos, sin) (B, hs) fp32 addresses
        for rotary, name in tables:
            cos = scratch.take(f"fused.{name}cos", (B, hs), torch.float32)  # for each sequence's position
            sin = scratch.take(f"fused.{name}sin", (B, hs), torch.float32)
            for table, dst in ((rotary.cos, cos), (rotary.sin, sin)):
                assert isinstance(table, torch.Tensor)
                if table.dtype == torch.float32:
                    torch.index_select(table, 0, pos, out=dst)
                else:
                    dst.copy_(table[pos])
            rope[bool(name)] = (cos.data_ptr(), sin.data_ptr())
        rope.setdefault(True, rope[False])
        write, rows, lens, Tk = step.decode_tables()
        scale = 1.0 / math.sqrt(hs) if cfg.attn_scale is None else cfg.attn_scale
        softcap = cfg.attn_softcap or 0.0
        threads = torch.get_num_threads()
        kv_base, kv_layer_bytes = cache.kv.data_ptr(), cache.kv.stride(0) * cache.kv.element_size()
        work_bytes = call("llama_decode_scratch_bytes", B, C, nh, nkv, hs, F, act)
        work = scratch.take("fused.layer", (work_bytes,), torch.uint8).data_ptr()
        write_p, rows_p, lens_p = (t.data_ptr() for t in (write, rows, lens))
        qkv_n = (nh + 2 * nkv) * hs
        # adapter rows: their deltas added in the one-call layers where the native kernels add them, else by the
        # projections' hooks (below)
        if not lora.active() or lora.native():
            key = (x.dtype, rope[False], rope[True], kv_base, kv_layer_bytes)
            if self._table is None or not self._table.valid(key):
                self._table = self._read_table(x.dtype, key, rope, kv_base, kv_layer_bytes, qkv_n)
            if self._table is not None and B <= self._table.rows:
                layers = self._table.table  # (L, LAYER_ARGS)
                if lora.active():  # this forward's adapters, in a copy
                    layers = layers.clone()
                    for i in range(len(self.layers)):
                        block = lora.native_block(f"blocks.{i}")
                        if block is not None:
                            slots, G, lora_a, lora_bt, ranks = block
                            layers[i, _LORA] = torch.tensor([slots, lora_a, lora_bt, ranks, G], dtype=torch.int64)
                failed = ctypes.c_int32(-1)
                try:
                    call(
                        "llama_decode_layers",
                        len(self.layers),
                        layers.data_ptr(),
                        x.data_ptr(),
                        B,
                        C,
                        cfg.norm_eps,
                        write_p,
                        rows_p,
                        lens_p,
                        Tk,
                        nh,
                        nkv,
                        hs,
                        F,
                        self.gate,
                        scale,
                        softcap,
                        act,
                        threads,
                        work,
                        work_bytes,
                        ctypes.addressof(failed),
                    )
                except KernelError as e:
                    e.add_note(f"layer {failed.value}")
                    raise
                return x
        h = scratch.take("fused.h", (B, C), x.dtype)  # the next projection's input
        att = scratch.take("fused.att", (B, nh * hs), x.dtype)
        g = scratch.take("fused.g", (B, F), x.dtype)
        attn_norm, _ = self._norms(self.layers[0], x.dtype)
        call("llama_rmsnorm", x.data_ptr(), attn_norm.data_ptr(), cfg.norm_eps, h.data_ptr(), B, C, act)
        for i, layer in enumerate(self.layers):
            qkv_proj, out_proj, in_proj, down_proj = layer.linears()
            _, ffn_norm = self._norms(layer, x.dtype)
            post_attn, post_ffn = self._post_norms(layer, x.dtype)
            q_norm, k_norm = self._qk_norms(layer, x.dtype)
            cos_p, sin_p = rope[layer.window > 0]
            qkv = qkv_proj(h).contiguous()  # (B, (nh + 2 nkv) hs), with the projection's bias
            call(
                "llama_attention",
                qkv.data_ptr(),
                B,
                cfg.norm_eps,
                _ptr(q_norm),
                _ptr(k_norm),
                cos_p,
                sin_p,
                kv_base + i * kv_layer_bytes,
                write_p,
                rows_p,
                lens_p,
                att.data_ptr(),
                Tk,
                nh,
                nkv,
                hs,
                scale,
                softcap,
                layer.window,
                act,
                threads,
                work,
                work_bytes,
                context=f"layer {i}",
            )
            o = out_proj(att).contiguous()  # (B, C)
            if post_attn is not None:  # (in place)
                call("llama_rmsnorm", o.data_ptr(), post_attn.data_ptr(), cfg.norm_eps, o.data_ptr(), B, C, act)
            call(
                "llama_add_rmsnorm",
                x.data_ptr(),
                o.data_ptr(),
                ffn_norm.data_ptr(),
                cfg.norm_eps,
                h.data_ptr(),
                B,
                C,
                act,
            )
            gu = in_proj(h).contiguous()  # (B, 2 F) = [gate | up]
            call("llama_swiglu", gu.data_ptr(), g.data_ptr(), B, F, self.gate, act)
            o = down_proj(g).contiguous()  # (B, C)
            if post_ffn is not None:
                call("llama_rmsnorm", o.data_ptr(), post_ffn.data_ptr(), cfg.norm_eps, o.data_ptr(), B, C, act)
            nxt = self._norms(self.layers[i + 1], x.dtype)[0].data_ptr() if i + 1 < len(self.layers) else None
            call("llama_add_rmsnorm", x.data_ptr(), o.data_ptr(), nxt, cfg.norm_eps, h.data_ptr(), B, C, act)
        return x

    def _read_table(
        self,
        dtype: torch.dtype,
        key: tuple[object, ...],
        rope: dict[bool, tuple[int, int]],
        kv_base: int,
        kv_layer_bytes: int,
        qkv_n: int,
    ) -> _LayerTable | None:
        """The layers' arguments as llama_decode_layers takes them, read from the modules now, with the step's rope
        tables (rope[windowed]: cos, sin addresses) and cache (`key`: what else the table holds); None where some
        layer is not one call (not all four projections quantized)."""
        rows = self.max_rows  # (refreshes every layer's weights)
        if rows == 0:
            return None
        values: list[int | None] = []
        watched: list[tuple[dict[str, object], str, object]] = []
        addresses: list[tuple[torch.Tensor, int]] = []
        biases: list[tuple[torch.Tensor, torch.Tensor]] = []
        held: list[object] = []  # the ctypes arrays the table points to
        for i, layer in enumerate(self.layers):
            watched += layer.watched()
            attn_norm, ffn_norm = self._norms(layer, dtype)
            post_attn, post_ffn = self._post_norms(layer, dtype)
            q_norm, k_norm = self._qk_norms(layer, dtype)
            for t in (attn_norm, ffn_norm, post_attn, post_ffn, q_norm, k_norm):
                if t is not None:
                    addresses.append((t, t.data_ptr()))
            bias, source = layer.qkv_bias(), _bias(layer.linears()[0])
            if bias is not None and source is not None:
                if bias.numel() != qkv_n:
                    raise ValueError(f"layer {i}'s QKV bias has {bias.numel()} values, its projection {qkv_n}")
                if bias.data_ptr() == source.data_ptr():  # (an fp32 bias, read in place)
                    addresses.append((source, source.data_ptr()))
                else:  # (its fp32 copy, made again at each step)
                    biases.append((source, bias))
            w, kinds, parts, i8 = layer.weights()
            held += [w, kinds, parts]
            cos, sin = rope[layer.window > 0]
            values += (
                attn_norm.data_ptr(),
                ffn_norm.data_ptr(),
                _ptr(post_attn),
                _ptr(post_ffn),
                ctypes.addressof(w),
                ctypes.addressof(kinds),
                None if parts is None else ctypes.addressof(parts),
                _ptr(bias),
                _ptr(q_norm),
                _ptr(k_norm),
                cos,
                sin,
                kv_base + i * kv_layer_bytes,
                None,  # LoRA: the forward's (lora_slots, lora_a, lora_bt, lora_ranks, lora_g)
                None,
                None,
                None,
                layer.window,
                i8,
                0,
            )
        table = torch.tensor([v or 0 for v in values], dtype=torch.int64).view(len(self.layers), len(LAYER_ARGS))
        return _LayerTable(table, rows, watched, addresses, biases, held, key)

    @staticmethod
    def _norms(layer: _Layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        attn_norm, ffn_norm = layer.norms()
        if (
            attn_norm.dtype != dtype
            or ffn_norm.dtype != dtype
            or not (attn_norm.is_contiguous() and ffn_norm.is_contiguous())
        ):
            raise ValueError(f"the layer's norms are {attn_norm.dtype}, the activations {dtype}")
        return attn_norm, ffn_norm

    @staticmethod
    def _post_norms(layer: _Layer, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        post = layer.post_norms()
        for w in post:
            if w is not None and (w.dtype != dtype or not w.is_contiguous()):
                raise ValueError(f"the layer's post-sublayer norms are {w.dtype}, the activations {dtype}")
        return post

    @staticmethod
    def _qk_norms(layer: _Layer, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q_norm, k_norm = layer.qk_norms()
        for w in (q_norm, k_norm):
            if w is not None and (w.dtype != dtype or not w.is_contiguous()):
                raise ValueError(f"the layer's QK-norms are {w.dtype}, the activations {dtype}")
        return q_norm, k_norm

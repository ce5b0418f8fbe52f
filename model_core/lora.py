"""LoRA adapters applied per row, never merged into the base weights.

An adapter (`LoRAAdapter`, made by model_core.weights.lora from a PEFT folder or a llama.cpp GGUF LoRA) holds, for
each of our projections it targets (module paths: "blocks.3.attn.qkv", ".attn.out", ".ffn.w_in", ".ffn.w_out"),
one low-rank pair in that projection's row order: A (r, in) and B (out, r) with the adapter's scale (alpha / r, or
alpha / sqrt(r) with rsLoRA) folded into B. A fused projection's targets are stacked: qkv = [q | k | v] rows, so A
is the targets' A's stacked (r_q + r_k + r_v, in) and B block-diagonal in their rows, zero where a part is not
targeted. So `W x + B (A x)` is the adapted projection of the stacked layer, and one pair of matmuls serves it.

A forward takes a `LoRABatch`: for each row (sequence) of the batch, the adapter it runs with or None (the base).
While the forward runs (`CausalLM.forward(..., lora=...)`), every targeted projection adds `B (A x)` to the output
rows of each adapter present: the rows gathered by adapter, (G adapters, M rows each), and all adapters' deltas of
the projection made by one pair of batched matmuls (G, M, in) @ (G, in, r) @ (G, r, out) (ranks padded with zeros),
so the cost grows with the adapters present, not with the rows; the other rows' outputs are not touched (an
index_add_ into the adapters' rows only), so a base row's logits are those of the model
without adapters bit for bit (in the fused decoder too: with the native kernels its one-call layers add each
projection's deltas (`native_block`, llama_decode_layer), else a step with adapter rows runs each layer as its
projections with native calls between them, which gives the one-call layer's results bit for bit, and the hooks
add the deltas to the projections' outputs; model_core.fused_decode).

The deltas are computed in float64 from the activations and rounded once to their dtype: the products of float32
(or bf16) values are exact in float64. On the CPU with the model's native kernels, `lora_add` (kernels/lora.c)
computes them in one call per projection from float32 copies of the pairs (the values exactly: they were read as
float32), each row's sums in one fixed order, so a row's delta is bit for bit the same in any batch; elsewhere two
batched float64 matmuls, whose BLAS summation order (which depends on how many rows it is given) moves the float64
sum far below the final rounding (tested: the engine's batch invariance holds for adapter rows too).

The projections read the step's choice through forward hooks, installed on the model's projections the first time
a forward runs with adapters (on the thread that runs the forwards: the engine's step thread), and a context
variable that holds the current forward's plan (per thread: another thread's forward never sees it). A hook with
no plan returns at once; the fused decoder's one-call layers call no module at all (they take the plan's native
pairs instead).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from model_core.native import Kernels
from model_core.qmatmul import ACT

TARGETS = ("attn.qkv", "attn.out", "ffn.w_in", "ffn.w_out")  # the projections of a block an adapter may target
_KEYS = itertools.count(1)  # each loaded adapter's own number: its prefix-cache key


@dataclass(frozen=True, eq=False)
class LoRAWeight:
    """One projection's low-rank update: out += b @ (a @ x); a (r, in), b (out, r) with the scale folded in."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A LoRA adapter bound to one model's projections (see the module's docstring). `key` is unique to this load
    (an adapter reloaded from changed files under the same name gets another): what keys the prefix cache."""

    name: str
    source: str  # the folder or file it was read from
    format: str  # "peft" or "gguf"
    rank: int  # the largest of its projections' ranks
    alpha: float
    layers: Mapping[str, LoRAWeight]  # module path -> weights (float64; on the model's device)
    arch: str  # the model family it was validated against (LMConfig.arch)
    key: str = ""
    # module path -> its pair as the native kernel reads it: A (r, in), B^T (r, out) float32 (the values exactly:
    # they were read as float32), made on first use
    f32: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", f"{self.name}#{next(_KEYS)}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers.values() for t in (w.a, w.b))

    def native_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Projection `name`'s pair for lora_add (A, B^T float32 contiguous), or None where it does not target it."""
        w = self.layers.get(name)
        if w is None:
            return None
        if name not in self.f32:
            self.f32[name] = (w.a.to(torch.float32).contiguous(), w.b.t().to(torch.float32).contiguous())
        return self.f32[name]

    def to(self, device: torch.device | str) -> LoRAAdapter:
        """The same adapter (same key) with its weights on `device` (float64 on the CPU, float32 elsewhere)."""
        dev = torch.device(device)
        dtype = torch.float64 if dev.type == "cpu" else torch.float32
        layers = {k: LoRAWeight(w.a.to(dev, dtype), w.b.to(dev, dtype)) for k, w in self.layers.items()}
        return LoRAAdapter(self.name, self.source, self.format, self.rank, self.alpha, layers, self.arch, self.key)


def check_fits(adapter: LoRAAdapter, model: nn.Module) -> None:
    """ValueError naming what of `adapter` does not fit `model` (a CausalLM): its family, a projection it targets that
    the model lacks, or one of another size."""
    arch = getattr(getattr(model, "cfg", None), "arch", None)
    if arch != adapter.arch:
        raise ValueError(f"LoRA adapter {adapter.name!r} was read for a {adapter.arch!r} model; this model is {arch!r}")
    modules = dict(model.named_modules())
    for path, w in adapter.layers.items():
        m = modules.get(path)
        if m is None:
            raise ValueError(f"LoRA adapter {adapter.name!r} targets {path!r}, which this model does not have")
        shape = (getattr(m, "out_features", None), getattr(m, "in_features", None))
        if shape != (w.b.shape[0], w.a.shape[1]):
            raise ValueError(
                f"LoRA adapter {adapter.name!r} updates {path!r} as {w.b.shape[0]}x{w.a.shape[1]}; the model's is "
                f"{shape[0]}x{shape[1]}"
            )


@dataclass(frozen=True, eq=False)
class LoRABatch:
    """A forward's adapter choice per row (sequence): `adapters[b]` for row b, None for the base model."""

    adapters: tuple[LoRAAdapter | None, ...]

    @staticmethod
    def of(adapters: Sequence[LoRAAdapter | None]) -> LoRABatch | None:
        """The choice for rows running with `adapters`; None where every row runs the base model."""
        return LoRABatch(tuple(adapters)) if any(a is not None for a in adapters) else None

    def groups(self) -> list[tuple[LoRAAdapter, list[int]]]:
        """Each adapter present with its rows, in order of first appearance."""
        rows: dict[int, tuple[LoRAAdapter, list[int]]] = {}
        for b, a in enumerate(self.adapters):
            if a is not None:
                rows.setdefault(id(a), (a, []))[1].append(b)
        return list(rows.values())


@dataclass(frozen=True, eq=False)
class _Rows:
    """Where the adapters' rows are in one layout of the forward's tokens (B*T padded, or the N real ones): `gather`
    (G*M,) takes each adapter's rows, M per adapter (the most any has; the short ones repeat a row, masked out by
    `valid`), into (G, M) order; `dest` (n,) says where the valid ones go back."""

    gather: torch.Tensor
    dest: torch.Tensor
    valid: torch.Tensor | None  # (G*M,) bool, None where every adapter has M rows
    M: int

    @staticmethod
    def of(groups: list[torch.Tensor]) -> _Rows:
        """groups: each adapter's token rows (n_g,) int64, in one layout."""
        M = max(int(g.numel()) for g in groups)
        if all(g.numel() == M for g in groups):
            gather = torch.cat(groups)
            return _Rows(gather, gather, None, M)
        pad = [torch.cat([g, g[:1].expand(M - g.numel())]) for g in groups]
        mask = [torch.arange(M, device=g.device) < g.numel() for g in groups]
        return _Rows(torch.cat(pad), torch.cat(groups), torch.cat(mask), M)


@dataclass(frozen=True, eq=False)
class _NativePairs:
    """Projections' pairs of a set of adapters as lora_add and llama_decode_layer take them: for each projection in
    turn, each slot's A (r, in) then (in `bt`) B^T (r, out), float32, stacked flat; ranks (projections x G) int32
    (0: the slot's adapter does not target the projection)."""

    a: torch.Tensor
    bt: torch.Tensor
    ranks: torch.Tensor

    @staticmethod
    def of(adapters: tuple[LoRAAdapter, ...], names: Sequence[str]) -> _NativePairs | None:
        """None where no adapter targets any of the projections `names`."""
        pairs = [a.native_pair(name) for name in names for a in adapters]
        present = [p for p in pairs if p is not None]
        if not present:
            return None
        return _NativePairs(
            torch.cat([a.reshape(-1) for a, _ in present]),
            torch.cat([bt.reshape(-1) for _, bt in present]),
            torch.tensor([0 if p is None else p[0].shape[0] for p in pairs], dtype=torch.int32),
        )


@dataclass(frozen=True, eq=False)
class _SetCache:
    """What the projections derived for one set of adapters (in its order), kept across steps: projection -> the
    stacked pairs (_stacked) and the native kernels' pairs (_NativePairs; a block -> its four projections' for the
    fused decoder's one-call layer), or None where no adapter targets it."""

    stacks: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    native: dict[str, _NativePairs | None] = field(default_factory=dict)  # a projection's, or a block's four


@dataclass(frozen=True, eq=False)
class _Plan:
    """The current forward's adapters (G) and their rows in the two layouts a projection may see: B*T (the module
    path, (B, T, C) inputs) and N (the fused decoder's real tokens, (N, C)); equal where nothing is padded. With the
    model's native kernels, each token's slot among the adapters (-1: the base) in both layouts, for lora_add."""

    adapters: tuple[LoRAAdapter, ...]
    padded: _Rows
    real: _Rows
    padded_n: int
    real_n: int
    cache: _SetCache
    kernels: Kernels | None = None
    slots_padded: torch.Tensor | None = None  # (B*T,) int32
    slots_real: torch.Tensor | None = None  # (N,) int32


_PLAN: ContextVar[_Plan | None] = ContextVar("lora_plan", default=None)
_INSTALL = threading.Lock()


def active() -> bool:
    """Whether the forward running on this thread has adapter rows."""
    return _PLAN.get() is not None


def native() -> bool:
    """Whether the forward running on this thread has adapter rows whose deltas the model's native kernels add (on
    the CPU): the fused decoder's one-call layers then take them (`native_block`); else it runs each layer as its
    projections, whose outputs the hooks add the deltas to."""
    plan = _PLAN.get()
    return plan is not None and plan.kernels is not None


def native_block(block: str) -> tuple[int, int, int, int, int] | None:
    """llama_decode_layer's LoRA arguments (lora_slots, lora_G, lora_a, lora_bt, lora_ranks; addresses) for block
    `block` ("blocks.3") of the current forward, over its real tokens, where `native()`; None where no adapter
    targets the block's projections (or the forward has none)."""
    plan = _PLAN.get()
    if plan is None or plan.kernels is None or plan.slots_real is None:
        return None
    cache = plan.cache.native
    if block not in cache:
        cache[block] = _NativePairs.of(plan.adapters, [f"{block}.{t}" for t in TARGETS])
    pairs = cache[block]
    if pairs is None:
        return None
    ptrs = (pairs.a.data_ptr(), pairs.bt.data_ptr(), pairs.ranks.data_ptr())
    return plan.slots_real.data_ptr(), len(plan.adapters), *ptrs


@contextmanager
def applied(model: nn.Module, lora: LoRABatch | None, B: int, T: int, real: torch.Tensor | None) -> Iterator[None]:
    """Run a forward of B rows of T tokens with `lora` (None: nothing to do). real: for a step served in place, the
    flat indices (N,) of its real tokens among the B*T (StepAttention.real_tokens' order), else None."""
    if lora is None:
        yield
        return
    if len(lora.adapters) != B:
        raise ValueError(f"a LoRA choice for {len(lora.adapters)} rows given to a forward of {B}")
    if not getattr(model, "_lora_hooks", False):
        install_hooks(model)
    groups = lora.groups()
    first = next(iter(groups[0][0].layers.values()), None)
    dev = first.a.device if first is not None else torch.device("cpu")
    padded, in_real = [], []
    owner = None if real is None else torch.div(real, T, rounding_mode="floor")  # (N,) the row of each real token
    for _, rows in groups:
        r = torch.tensor(rows, dtype=torch.int64, device=dev)
        padded.append((r.view(-1, 1) * T + torch.arange(T, device=dev)).reshape(-1))  # (n*T,) its rows' tokens
        if owner is not None:
            in_real.append(torch.isin(owner, r).nonzero().view(-1))
    p_rows = _Rows.of(padded)
    adapters = tuple(a for a, _ in groups)
    kernels = getattr(model, "kernels", None)
    slots_padded = slots_real = None
    if kernels is not None and dev.type == "cpu":
        slot = torch.full((B,), -1, dtype=torch.int32)  # each row's adapter's slot
        for g, (_, rows) in enumerate(groups):
            slot[rows] = g
        slots_padded = slot.repeat_interleave(T)  # (B*T,)
        slots_real = slots_padded if real is None else slots_padded[real].contiguous()  # (N,)
    plan = _Plan(
        adapters,
        p_rows,
        p_rows if owner is None else _Rows.of(in_real),
        B * T,
        B * T if real is None else int(real.numel()),
        _cache_for(model, adapters),
        kernels if slots_padded is not None else None,
        slots_padded,
        slots_real,
    )
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def install_hooks(model: nn.Module) -> int:
    """Give every block projection of `model` the hook that adds the current forward's deltas (once per model);
    returns how many projections have it. Call it on the thread that runs the model's forwards (CausalLM.forward
    does, the first time it is given adapters): a hook added while another thread runs the module would race."""
    with _INSTALL:
        n = 0
        for name, module in model.named_modules():
            if not name.startswith("blocks.") or not name.endswith(TARGETS):
                continue
            n += 1
            if not getattr(module, "_lora_hooked", False):
                module.register_forward_hook(_hook(name))
                module._lora_hooked = True  # (a plain attribute of its own)
        model.__dict__["_lora_hooks"] = True  # (a plain attribute: the hooks are in place)
        return n


_Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], "torch.Tensor | None"]


STACKED_SETS = 4  # sets of adapters whose stacked pairs a model keeps (a step's decodes and prefill groups differ)


def _cache_for(model: nn.Module, adapters: tuple[LoRAAdapter, ...]) -> _SetCache:
    """The projections' pairs for this set of adapters (in this order), filled as the projections run: kept for the
    last STACKED_SETS sets (a decode batch's set stays the same from step to step: stacking them again at each step
    took a fifth of a SmolLM2 step of 16 rows over 4 adapters)."""
    cache: OrderedDict[tuple[str, ...], _SetCache] = model.__dict__.setdefault("_lora_stacks", OrderedDict())
    key = tuple(a.key for a in adapters)
    found = cache.pop(key, None)
    cache[key] = found = _SetCache() if found is None else found
    while len(cache) > STACKED_SETS:
        cache.popitem(last=False)
    return found


def _stacked(weights: list[LoRAWeight | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapters' pairs of one projection transposed and stacked, contiguous (a float64 bmm on transposed views
    took 3.4x as long): A^T (G, in, r) and B^T (G, r, out) (ranks padded with zeros, an adapter that does not target
    it all zeros), or None where none targets it."""
    present = [w for w in weights if w is not None]
    if not present:
        return None
    r = max(w.a.shape[0] for w in present)
    if len(present) == len(weights) and all(w.a.shape[0] == r for w in present):
        return torch.stack([w.a.t() for w in present]), torch.stack([w.b.t() for w in present])
    ref = present[0]
    at = ref.a.new_zeros(len(weights), ref.a.shape[1], r)
    bt = ref.b.new_zeros(len(weights), r, ref.b.shape[0])
    for g, w in enumerate(weights):
        if w is not None:
            at[g, :, : w.a.shape[0]] = w.a.t()
            bt[g, : w.a.shape[0]] = w.b.t()
    return at, bt


def _hook(name: str) -> _Hook:
    """The forward hook of projection `name`: adds each adapter's delta to its rows' outputs, all adapters in one
    pair of batched matmuls (G, M, in) @ (G, in, r) @ (G, r, out)."""

    def add_deltas(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        plan = _PLAN.get()
        if plan is None:
            return None
        x = args[0]
        n_in, n_out = x.shape[-1], out.shape[-1]
        rows = x.numel() // max(n_in, 1)
        if rows not in (plan.padded_n, plan.real_n):
            raise ValueError(f"{name}: a LoRA forward of {plan.padded_n} (real {plan.real_n}) rows sees {rows}")
        if plan.kernels is not None and _native_fits(x, out):
            return _add_native(plan, name, x, out, rows)
        stacks = plan.cache.stacks
        pair = stacks[name] if name in stacks else None
        if name not in stacks:
            pair = stacks[name] = _stacked([a.layers.get(name) for a in plan.adapters])
        if pair is None:
            return None
        at, bt = pair
        flat_x, flat = x.reshape(rows, n_in), out.reshape(rows, n_out)  # (rows, in), (rows, out)
        where = plan.padded if rows == plan.padded_n else plan.real
        xs = flat_x.index_select(0, where.gather).to(at.dtype).view(len(plan.adapters), where.M, n_in)  # (G, M, in)
        delta = torch.bmm(torch.bmm(xs, at), bt).view(-1, n_out)  # (G*M, out)
        if where.valid is not None:
            delta = delta[where.valid]
        # out + delta in float64, rounded once (see the module's docstring); index_copy_ of the sums: a bf16
        # index_add_ took 15x as long
        total = flat.index_select(0, where.dest).to(delta.dtype) + delta  # (n, out)
        flat.index_copy_(0, where.dest, total.to(flat.dtype))
        return flat.view(out.shape)

    return add_deltas


def _native_fits(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether lora_add takes this projection's input and output as they are (CPU, the kernels' dtypes, contiguous)."""
    return (
        x.device.type == "cpu"
        and x.dtype in ACT
        and out.dtype == x.dtype
        and out.device.type == "cpu"
        and x.is_contiguous()
        and out.is_contiguous()
    )


def _add_native(plan: _Plan, name: str, x: torch.Tensor, out: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The deltas added in place by the native kernel: each row's own adapter, one fixed order of double sums per
    row (kernels/lora.c), so a row's result is the same in any batch."""
    native = plan.cache.native
    if name not in native:
        native[name] = _NativePairs.of(plan.adapters, [name])
    pairs = native[name]
    if pairs is None:
        return None
    assert plan.kernels is not None and plan.slots_padded is not None and plan.slots_real is not None
    slots = plan.slots_padded if rows == plan.padded_n else plan.slots_real
    n_in, n_out = x.shape[-1], out.shape[-1]
    plan.kernels.call(
        "lora_add",
        x.data_ptr(),
        out.data_ptr(),
        rows,
        n_in,
        n_out,
        ACT[x.dtype],
        slots.data_ptr(),
        len(plan.adapters),
        pairs.a.data_ptr(),
        pairs.bt.data_ptr(),
        pairs.ranks.data_ptr(),
        torch.get_num_threads(),
        context=f"LoRA deltas of {name}",
    )
    return out

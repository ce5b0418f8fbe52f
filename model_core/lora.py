"""LoRA adapters applied per row, never merged into the base weights.

An adapter (`LoRAAdapter`, made by model_core.weights.lora from a PEFT folder or a llama.cpp GGUF LoRA) holds, for
each of our projections it targets (module paths: "blocks.3.attn.qkv", ".attn.out", ".ffn.w_in", ".ffn.w_out"),
one low-rank pair in that projection's row order: A (r, in) and B (out, r) with the adapter's scale (alpha / r, or
alpha / sqrt(r) with rsLoRA) folded into B. A fused projection's targets are stacked: qkv = [q | k | v] rows, so A
is the targets' A's stacked (r_q + r_k + r_v, in) and B block-diagonal in their rows, zero where a part is not
targeted. So `W x + B (A x)` is the adapted projection of the stacked layer, and one pair of matmuls serves it.

A forward takes a `LoRABatch`: for each row (sequence) of the batch, the adapter it runs with or None (the base).
While the forward runs (`CausalLM.forward(..., lora=...)`), every targeted projection adds `B (A x)` to the output
rows of each adapter present, grouped by adapter (one pair of small matmuls per adapter and projection, whatever
the number of its rows); the other rows' outputs are not touched, so a base row's logits are those of the model
without adapters bit for bit (in the fused decoder too: a step with adapter rows runs each layer as its
projections with native calls between them, which gives the one-call layer's results bit for bit, and the deltas
are added to the projections' outputs; model_core.fused_decode).

The deltas are computed in float64 from the activations and rounded once to their dtype: the products of float32
(or bf16) values are exact in float64, and the order BLAS sums them in (which depends on how many rows it is
given) moves the float64 sum far below the final rounding, so a row's delta is the same whatever it is batched
with (tested: the engine's batch invariance holds for adapter rows too).

The projections read the step's choice through forward hooks, installed on the model's projections the first time
a forward runs with adapters (on the thread that runs the forwards: the engine's step thread), and a context
variable that holds the current forward's plan (per thread: another thread's forward never sees it). A hook with
no plan returns at once; the fused decoder's one-call layers, which serve every step without adapter rows, call
no module at all.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

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

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", f"{self.name}#{next(_KEYS)}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers.values() for t in (w.a, w.b))

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
class _Group:
    adapter: LoRAAdapter
    padded: torch.Tensor  # (n,) int64: its token rows among the forward's B*T (padding included)
    real: torch.Tensor  # (m,) int64: among the N real tokens of a step served in place (fused decoder), else padded


@dataclass(frozen=True, eq=False)
class _Plan:
    """The current forward's groups, with the two row counts a projection may see: B*T (the module path, (B, T, C)
    inputs) and N (the fused decoder's real tokens, (N, C)); equal where nothing is padded (then so are the rows)."""

    groups: tuple[_Group, ...]
    padded_n: int
    real_n: int


_PLAN: ContextVar[_Plan | None] = ContextVar("lora_plan", default=None)
_INSTALL = threading.Lock()


def active() -> bool:
    """Whether the forward running on this thread has adapter rows (the fused decoder then runs each layer as its
    projections, whose outputs the adapters' deltas are added to)."""
    return _PLAN.get() is not None


@contextmanager
def applied(model: nn.Module, lora: LoRABatch | None, B: int, T: int, real: torch.Tensor | None) -> Iterator[None]:
    """Run a forward of B rows of T tokens with `lora` (None: nothing to do). real: for a step served in place, the
    flat indices (N,) of its real tokens among the B*T (StepAttention.real_tokens' order), else None."""
    if lora is None:
        yield
        return
    if len(lora.adapters) != B:
        raise ValueError(f"a LoRA choice for {len(lora.adapters)} rows given to a forward of {B}")
    install_hooks(model)
    dev = next(iter(model.parameters())).device
    groups = []
    for adapter, rows in lora.groups():
        r = torch.tensor(rows, dtype=torch.int64, device=dev)
        padded = (r.view(-1, 1) * T + torch.arange(T, device=dev)).reshape(-1)  # (n*T,) token rows of those rows
        if real is None:
            groups.append(_Group(adapter, padded, padded))
            continue
        owner = torch.div(real, T, rounding_mode="floor")  # (N,) the row of each real token
        groups.append(_Group(adapter, padded, torch.isin(owner, r).nonzero().view(-1)))
    n_real = B * T if real is None else int(real.numel())
    token = _PLAN.set(_Plan(tuple(groups), B * T, n_real))
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
        return n


_Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], "torch.Tensor | None"]


def _hook(name: str) -> _Hook:
    """The forward hook of projection `name`: adds each adapter's delta to its rows' outputs."""

    def add_deltas(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        plan = _PLAN.get()
        if plan is None:
            return None
        x = args[0]
        n_in, n_out = x.shape[-1], out.shape[-1]
        rows = x.numel() // max(n_in, 1)
        if rows not in (plan.padded_n, plan.real_n):
            raise ValueError(f"{name}: a LoRA forward of {plan.padded_n} (real {plan.real_n}) rows sees {rows}")
        flat_x, flat = x.reshape(rows, n_in), out.reshape(rows, n_out)  # (rows, in), (rows, out)
        for g in plan.groups:
            w = g.adapter.layers.get(name)
            if w is None:
                continue
            idx = g.padded if rows == plan.padded_n else g.real
            xs = flat_x.index_select(0, idx).to(w.a.dtype)  # (n, in)
            delta = (xs @ w.a.t()) @ w.b.t()  # (n, out), float64 (see the module's docstring)
            flat.index_add_(0, idx, delta.to(flat.dtype))
        return flat.view(out.shape)

    return add_deltas

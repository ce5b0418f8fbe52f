"""SamplingParams and pure, batched logits processing and sampling.

Used by the reference `generate()` and by the continuous-batching engine, whose batches mix rows of
different requests. Every function here is row-independent: a row's result is bit-identical whether it
is processed alone or in any batch (on the CPU; on a GPU up to the kernels' own determinism). Sampling
draws exactly one float64 uniform number per sampled row per call from that row's own generator and
inverts the row's CDF (a float64 prefix sum of its softmax), so a request's random stream never depends
on its batch; this costs one cumsum per step where an exponential race would draw V numbers per row.

Order of processing (`process_logits`): logit_bias, min_tokens masking, repetition penalty,
presence/frequency penalties, temperature, top-k, top-p, min-p. Greedy rows skip temperature and the
three filters (they cannot change an argmax).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence / frequency in [-2, 2], repetition in (0, 2]
MAX_BIAS = 100.0  # logit_bias values in [-100, 100]
_TOP_P_FIRST_K = 64  # top-p first looks for the nucleus among this many tokens, then 8x more each round


class SamplingParamsError(ValueError):
    """A SamplingParams field out of its range. `field` is the request field's name (e.g. "logit_bias")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _in(x: object, lo: float, hi: float, lo_open: bool = False) -> bool:
    """x is a number in [lo, hi] ((lo, hi] when lo_open); NaN never is."""
    return _is_num(x) and (lo < x if lo_open else lo <= x) and x <= hi  # type: ignore[operator]


def _check(ok: bool, field: str, allowed: str, value: object, what: str | None = None) -> None:
    if not ok:
        raise SamplingParamsError(field, f"{what or field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI / vLLM semantics)."""

    max_tokens: int = 16  # the engine also takes 0: score the prompt only (generate() needs >= 1)
    temperature: float = 1.0  # [0, 2]; 0 (or < GREEDY_EPS) means greedy argmax
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = off, else 1..vocab_size
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # (0, 2]; HF/vLLM semantics, applies to prompt + output tokens
    presence_penalty: float = 0.0  # [-2, 2]; OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0  # [-2, 2]; OpenAI semantics, output tokens only
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias in [-100, 100])
    seed: int | None = None  # any int (taken mod 2**64)
    stop: tuple[str, ...] = ()  # non-empty strings
    stop_token_ids: tuple[int, ...] = ()  # ids in [0, vocab_size)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0..20), None = none
    min_tokens: int = 0  # [0, max_tokens]; EOS/stop_token_ids masked until this many output tokens
    prompt_logprobs: int | None = None  # score the prompt: logprob, rank and this many top logprobs per position

    def __post_init__(self) -> None:
        # Accept lists where tuples are declared, so params stay hashable and immutable.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.logit_bias, list):
            object.__setattr__(self, "logit_bias", tuple(tuple(p) for p in self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self, vocab_size: int | None = None) -> None:
        """The one check of what the fields mean (OpenAI / vLLM bounds; the API checks only the request's
        shape, the engine trusts what passed). Token ids are checked against vocab_size when given.
        Raises SamplingParamsError naming the first bad field, its allowed range and the value."""
        vocab = f"an int in [0, {vocab_size})" if vocab_size is not None else "an int >= 0"

        def token_ok(t: object) -> bool:
            return _is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)  # type: ignore[operator]

        _check(_is_int(self.max_tokens) and self.max_tokens >= 0, "max_tokens", "an int >= 0", self.max_tokens)
        _check(
            _in(self.temperature, 0.0, MAX_TEMPERATURE), "temperature", f"in [0.0, {MAX_TEMPERATURE}]", self.temperature
        )
        _check(_in(self.top_p, 0.0, 1.0, lo_open=True), "top_p", "in (0.0, 1.0]", self.top_p)
        k_max = math.inf if vocab_size is None else vocab_size
        _check(
            _is_int(self.top_k) and (self.top_k in (-1, 0) or 1 <= self.top_k <= k_max),
            "top_k",
            "-1 or 0 (off) or " + ("an int >= 1" if vocab_size is None else f"an int in [1, {vocab_size}]"),
            self.top_k,
        )
        _check(_in(self.min_p, 0.0, 1.0), "min_p", "in [0.0, 1.0]", self.min_p)
        _check(
            _in(self.repetition_penalty, 0.0, MAX_PENALTY, lo_open=True),
            "repetition_penalty",
            f"in (0.0, {MAX_PENALTY}]",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_in(value, -MAX_PENALTY, MAX_PENALTY), name, f"in [{-MAX_PENALTY}, {MAX_PENALTY}]", value)
        _check(isinstance(self.logit_bias, tuple), "logit_bias", "a tuple of (token_id, bias)", self.logit_bias)
        seen: set[int] = set()
        for pair in self.logit_bias:
            _check(isinstance(pair, tuple) and len(pair) == 2, "logit_bias", "pairs of (token_id, bias)", pair)
            token, bias = pair
            _check(token_ok(token), "logit_bias", vocab, token, "logit_bias token ids")
            _check(token not in seen, "logit_bias", "unique", token, "logit_bias token ids")
            seen.add(token)
            _check(
                _in(bias, -MAX_BIAS, MAX_BIAS), "logit_bias", f"in [{-MAX_BIAS}, {MAX_BIAS}]", bias, "logit_bias values"
            )
        _check(self.seed is None or _is_int(self.seed), "seed", "an int or None", self.seed)
        _check(isinstance(self.stop, tuple), "stop", "a tuple of non-empty strings", self.stop)
        for s in self.stop:
            _check(isinstance(s, str) and len(s) > 0, "stop", "non-empty strings", s, "stop strings")
        _check(isinstance(self.stop_token_ids, tuple), "stop_token_ids", f"a tuple of {vocab}", self.stop_token_ids)
        for t in self.stop_token_ids:
            _check(token_ok(t), "stop_token_ids", vocab, t, "stop_token_ids entries")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and _in(value, 0, MAX_LOGPROBS)),
                name,
                f"None or an int in [0, {MAX_LOGPROBS}]",
                value,
            )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"an int in [0, max_tokens={self.max_tokens}]",
            self.min_tokens,
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed` (any int, taken mod 2**64), or from os.urandom when None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    g = torch.Generator(device=device)
    g.manual_seed(seed % (1 << 64))
    return g


def _on_rows(x: torch.Tensor, flags: Sequence[bool], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn to the rows of x (B, V) where flags is true; no gather/scatter when all rows are."""
    if all(flags):
        return fn(x)
    idx = torch.tensor([i for i, f in enumerate(flags) if f], dtype=torch.long, device=x.device)
    x[idx] = fn(x[idx])
    return x


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # (B, 1)


def _flat_ids(
    rows: Sequence[int], ids_per_row: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of the given rows' ids, ids outside [0, vocab) dropped."""
    parts = [torch.as_tensor(ids_per_row[i], dtype=torch.long).reshape(-1) for i in rows]
    if not parts:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    tok = torch.cat(parts)
    row = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), torch.tensor([p.numel() for p in parts]))
    keep = (tok >= 0) & (tok < vocab)
    return row[keep].to(device), tok[keep].to(device)


def _mask_top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mask to -inf everything below each row's k-th largest value (ties with it are kept), in place. x: (n, V)."""
    k = torch.tensor(ks, dtype=torch.long, device=x.device).unsqueeze(1)  # (n, 1)
    top = torch.topk(x, max(ks), dim=-1).values  # (n, kmax), sorted descending
    thresh = top.gather(1, k - 1)  # (n, 1): the k-th largest value, whatever kmax is
    return x.masked_fill_(x < thresh, float("-inf"))


def _mask_top_p(x: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches p (ties at the edge kept), in place.
    x: (n, V).

    A row with fewer finite logits than the first search width (64: after a top-k of at most 64, or a grammar
    mask) is done on its top 64 alone. Otherwise the nucleus is searched among the top 64 tokens, then 512, 4096,
    and only then by a full sort, against the row's total mass (`_row_mass`): the answer does not depend on where
    it is found. Which way a row goes depends on that row alone, and every sum runs within one row in an order
    its length fixes, so no result depends on other rows.
    """
    n, V = x.shape
    dev = x.device
    target_p = torch.tensor(ps, dtype=torch.float64, device=dev).unsqueeze(1)  # (n, 1)
    thresh = torch.full((n, 1), float("-inf"), dtype=x.dtype, device=dev)
    k = min(_TOP_P_FIRST_K, V)
    vals, _ = torch.topk(x, k, dim=-1)  # (n, k) descending
    few = ~torch.isfinite(vals[:, -1]) if k < V else torch.ones(n, dtype=torch.bool, device=dev)  # (n,)
    if few.any():  # every finite logit is among the top k: the distribution is softmax(vals)
        fv = vals[few]  # (f, k)
        cum = torch.cumsum(torch.softmax(fv, dim=-1), -1, dtype=torch.float64)  # (f, k)
        thresh[few] = _nucleus_edge(fv, cum, target_p[few] * cum[:, -1:])
    rest = torch.arange(n, device=dev)[~few]
    if rest.numel():
        thresh[rest] = _search_top_p(x[rest], target_p[rest])
    return x.masked_fill_(x < thresh, float("-inf"))


def _nucleus_edge(vals: torch.Tensor, cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The smallest kept value: vals (m, k) descending, cum (m, k) their float64 prefix sums of probability,
    target (m, 1) the mass to reach. Returns (m, 1)."""
    excl = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass before each token
    n_keep = (excl < target).sum(-1, keepdim=True).clamp(min=1)  # (m, 1)
    return vals.gather(1, n_keep - 1)


def _search_top_p(x: torch.Tensor, target_p: torch.Tensor) -> torch.Tensor:
    """The nucleus edge (n, 1) of rows x (n, V) with more finite logits than the first search width, in widening
    rounds; target_p (n, 1) float64."""
    n, V = x.shape
    probs = torch.softmax(x, dim=-1)  # (n, V)
    target = target_p * _row_mass(probs).unsqueeze(1)  # (n, 1) float64
    thresh = torch.empty(n, 1, dtype=x.dtype, device=x.device)
    pending = torch.arange(n, device=x.device)
    k = _TOP_P_FIRST_K
    while pending.numel():
        sub = x if pending.numel() == n else x[pending]
        full = k >= V
        vals, idx = torch.sort(sub, dim=-1, descending=True) if full else torch.topk(sub, k, dim=-1)  # (m, k)
        cum = torch.cumsum((probs if pending.numel() == n else probs[pending]).gather(1, idx), -1, dtype=torch.float64)
        found = (
            torch.ones(len(pending), dtype=torch.bool, device=x.device) if full else cum[:, -1] >= target[pending, 0]
        )
        thresh[pending[found]] = _nucleus_edge(vals, cum, target[pending])[found]
        pending = pending[~found]
        k *= 8
    return thresh


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Apply each row's SamplingParams to logits (B, V) and return processed float32 logits (B, V).

    Features no row uses cost nothing. Masked tokens become -inf. The input is never modified; where nothing
    applies the result is the input itself (float32 input), so a caller that changes the result must own its input.
    """
    B, V = logits.shape
    if not (len(params) == len(prompt_ids) == len(output_ids) == B):
        raise ValueError(
            f"batch mismatch: logits {B} rows, {len(params)} params, "
            f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
        )
    dev = logits.device
    x = logits  # (B, V); a float32 copy of our own before the first change (`_own`)
    rows = range(B)

    # logit_bias: x[i, t] += bias
    if any(p.logit_bias for p in params):
        r = [i for i in rows for _ in params[i].logit_bias]
        t = [tok for p in params for tok, _ in p.logit_bias]
        b = [bias for p in params for _, bias in p.logit_bias]
        rt, tt = torch.tensor(r, dtype=torch.long), torch.tensor(t, dtype=torch.long)
        keep = (tt >= 0) & (tt < V)
        bias = torch.tensor(b, dtype=torch.float32)[keep].to(dev)
        x = _own(x, logits)
        x.index_put_((rt[keep].to(dev), tt[keep].to(dev)), bias, accumulate=True)

    # min_tokens: stop ids (and EOS unless ignore_eos) impossible until enough output tokens
    stop_lists = [
        list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
        if len(output_ids[i]) < p.min_tokens
        else []
        for i, p in enumerate(params)
    ]
    if any(stop_lists):
        rr, tt = _flat_ids(rows, stop_lists, V, dev)
        x = _own(x, logits)
        x[rr, tt] = float("-inf")

    # repetition penalty over prompt + output: positive logits divided, negative multiplied
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep_rows:
        r1, t1 = _flat_ids(rep_rows, prompt_ids, V, dev)
        r2, t2 = _flat_ids(rep_rows, output_ids, V, dev)
        seen = torch.unique(torch.cat([r1, r2]) * V + torch.cat([t1, t2]))  # flat indices into x
        pen = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)[seen // V]
        x = _own(x, logits)
        flat = x.view(-1)
        vals = flat[seen]
        flat[seen] = torch.where(vals < 0, vals * pen, vals / pen)

    # presence / frequency penalties over output tokens only: x -= presence * [count > 0] + frequency * count
    pf_rows = [i for i in rows if params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0]
    if pf_rows:
        rr, tt = _flat_ids(pf_rows, output_ids, V, dev)
        keys, counts = torch.unique(rr * V + tt, return_counts=True)
        owner = keys // V
        pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)[owner]
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)[owner]
        x = _own(x, logits)
        flat = x.view(-1)
        flat[keys] = flat[keys] - (pres + freq * counts.float())

    sampled = [not p.greedy for p in params]
    # temperature (greedy rows keep theirs at 1: x / 1 == x exactly)
    temps = [p.temperature if s else 1.0 for p, s in zip(params, sampled, strict=True)]
    if any(t != 1.0 for t in temps):
        x = _own(x, logits)
        x.div_(_column(temps, dev))

    # top-k: keep the k largest (ties with the k-th kept)
    ks = [p.top_k if s and 0 < p.top_k < V else 0 for p, s in zip(params, sampled, strict=True)]
    if any(ks):
        x = _on_rows(_own(x, logits), [k > 0 for k in ks], lambda rows: _mask_top_k(rows, [k for k in ks if k > 0]))

    # top-p on the (renormalised) distribution left by top-k
    ps = [p.top_p if s else 1.0 for p, s in zip(params, sampled, strict=True)]
    if any(p < 1.0 for p in ps):
        x = _on_rows(_own(x, logits), [p < 1.0 for p in ps], lambda rows: _mask_top_p(rows, [p for p in ps if p < 1.0]))

    # min-p: keep tokens with prob >= min_p * max prob, i.e. x >= max + log(min_p) (no exp over the vocabulary)
    mps = [p.min_p if s else 0.0 for p, s in zip(params, sampled, strict=True)]
    if any(m > 0.0 for m in mps):
        x = _own(x, logits)
        mx = x.max(dim=-1, keepdim=True).values  # (B, 1)
        floor = mx + torch.log(_column(mps, dev))  # (B, 1); -inf where min_p is 0 (or the row has no finite logit)
        x.masked_fill_(x < floor, float("-inf"))
    return x.to(torch.float32).contiguous()  # (x is logits where nothing applied)


def _own(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x, or where x is still the caller's logits, a float32 copy of them to change."""
    return logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True) if x is logits else x


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Token ids (B,) int64 from processed logits (B, V): argmax for greedy rows, else one draw each.

    A sampled row draws one float64 uniform u from its own generator (the global one when None) and
    takes the first token whose float64 prefix sum of softmax(x) exceeds u * total (inverse CDF).
    Greedy rows draw nothing.
    """
    B, V = logits.shape
    if not (len(params) == len(generators) == B):
        raise ValueError(f"batch mismatch: logits {B} rows, {len(params)} params, {len(generators)} generators")
    x = logits.float()
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        return greedy_ids(x)
    rows = [i for i in range(B) if sampled[i]]
    idx = None if len(rows) == B else torch.tensor(rows, dtype=torch.long, device=x.device)
    xs = x if idx is None else x[idx]  # (n, V)
    u = torch.stack(
        [
            torch.rand((), dtype=torch.float64, generator=g, device=g.device if g is not None else "cpu")
            for g in (generators[i] for i in rows)
        ]
    ).to(x.device)  # (n,)
    tok = _inverse_cdf(torch.softmax(xs, dim=-1), u)
    if idx is None:
        return tok
    out = greedy_ids(x)  # (B,): greedy rows keep their argmax
    out[idx] = tok
    return out


def greedy_ids(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (B,) int64 of x (B, V): the first of its largest values (a NaN's where it has one, as
    torch.argmax). torch.max's indices, documented the same, take a third of argmax's time on the CPU."""
    return x.max(dim=-1).indices


_BLOCK = 256


def _blocks(p: torch.Tensor) -> torch.Tensor:
    """p (n, V) -> (n, nb, 256): the row in blocks of 256 (zero-padded at the end)."""
    n, V = p.shape
    nb = (V + _BLOCK - 1) // _BLOCK
    if nb * _BLOCK != V:
        p = torch.nn.functional.pad(p, (0, nb * _BLOCK - V))
    return p.view(n, nb, _BLOCK)


def _row_mass(p: torch.Tensor) -> torch.Tensor:
    """The sum of each row of p (n, V) float32 >= 0, as float64 (n,): sums of 256-value blocks, then of the blocks,
    each in an order fixed by the row's length alone (never by other rows); one pass over the vocabulary where a
    float64 prefix sum of it is ~40x slower at V=262144."""
    return _blocks(p).sum(dim=-1).double().sum(dim=-1)


def _last_nonzero(p: torch.Tensor) -> torch.Tensor:
    """Index of the last positive entry of each row of p (n, m)."""
    m = p.shape[-1]
    return (m - 1) - torch.argmax((p.flip(-1) > 0).to(torch.int8), dim=-1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose prefix sum of probs exceeds u * total, found in two levels:
    sums of 256-token blocks pick the block, a prefix sum inside it picks the token. This is the
    inverse CDF without a sequential prefix sum over the whole vocabulary (5x faster at V=49152).
    Every operation works within one row, so a row's result never depends on the others.

    probs: (n, V) float32 >= 0; u: (n,) float64 in [0, 1). Returns (n,) int64.
    """
    n = probs.shape[0]
    blocks = _blocks(probs)  # (n, nb, 256)
    nb = blocks.shape[1]
    bsum = blocks.sum(dim=-1).double()  # (n, nb)
    bcum = torch.cumsum(bsum, dim=-1)  # (n, nb)
    r = u * bcum[:, -1]  # (n,)
    blk = torch.searchsorted(bcum, r.unsqueeze(1), right=True).squeeze(1)  # (n,)
    blk = torch.where(blk >= nb, _last_nonzero(bsum), blk)  # rounding put r at the very top
    before = torch.where(
        blk > 0, bcum.gather(1, (blk - 1).clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros_like(r)
    )  # (n,) mass of the blocks before
    inner = blocks[torch.arange(n, device=probs.device), blk]  # (n, 256)
    icum = torch.cumsum(inner, dim=-1, dtype=torch.float64)  # (n, 256)
    j = torch.searchsorted(icum, (r - before).unsqueeze(1), right=True).squeeze(1)  # (n,)
    j = torch.where(j >= _BLOCK, _last_nonzero(inner), j)
    return blk * _BLOCK + j


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, top_n: Sequence[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: (logprob of token_ids[i], top_n[i] most likely [(token_id, logprob)] descending).

    Logprobs are of the model's raw distribution, log_softmax(raw_logits), as OpenAI and vLLM report.
    """
    B = raw_logits.shape[0]
    if not (token_ids.shape[0] == len(top_n) == B):
        raise ValueError(f"batch mismatch: logits {B} rows, {token_ids.shape[0]} tokens, {len(top_n)} top_n")
    lp = torch.log_softmax(raw_logits.float(), dim=-1)  # (B, V)
    chosen = lp.gather(1, token_ids.to(lp.device, torch.long).reshape(B, 1)).squeeze(1).tolist()
    n_max = min(max(top_n, default=0), lp.shape[1])
    if n_max > 0:
        top = torch.topk(lp, n_max, dim=-1)
        vals, ids = top.values.tolist(), top.indices.tolist()
    else:
        vals, ids = [[] for _ in range(B)], [[] for _ in range(B)]
    return [(chosen[i], [(ids[i][j], vals[i][j]) for j in range(min(top_n[i], n_max))]) for i in range(B)]


@dataclass(frozen=True)
class TokenScore:
    """How the model scored one given token: its logprob, its rank (1 = most likely) and the top tokens."""

    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


def score_tokens(raw_logits: torch.Tensor, token_ids: torch.Tensor, top_n: int) -> list[TokenScore]:
    """raw_logits: (N, V); token_ids: (N,). Per row the fp32 log_softmax score of token_ids[i] (prompt logprobs).
    The caller bounds N: this allocates an (N, V) fp32 tensor."""
    N = raw_logits.shape[0]
    if token_ids.shape[0] != N:
        raise ValueError(f"batch mismatch: logits {N} rows, {token_ids.shape[0]} tokens")
    lp = torch.log_softmax(raw_logits.float(), dim=-1)  # (N, V)
    chosen = lp.gather(1, token_ids.to(lp.device, torch.long).reshape(N, 1))  # (N, 1)
    ranks = (lp > chosen).sum(dim=-1).add(1).tolist()  # (N,)
    n = min(top_n, lp.shape[1])
    if n > 0:
        top = torch.topk(lp, n, dim=-1)
        vals, ids = top.values.tolist(), top.indices.tolist()
    else:
        vals, ids = [[] for _ in range(N)], [[] for _ in range(N)]
    return [
        TokenScore(c, int(r), tuple(zip(i, v, strict=True)))
        for c, r, i, v in zip(chosen.squeeze(1).tolist(), ranks, ids, vals, strict=True)
    ]

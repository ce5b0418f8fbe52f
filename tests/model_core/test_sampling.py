"""Sampling: processors against loop/numpy references, seeded and batch-independent sampling."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model_core.generate import generate
from model_core.sampling import (
    GREEDY_EPS,
    SamplingParams,
    SamplingParamsError,
    compute_logprobs,
    greedy_ids,
    make_generator,
    process_logits,
    sample,
)
from tests.utils import tiny_llama

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEG_INF = float("-inf")


def logits_arrays(max_rows: int = 4, min_v: int = 2, max_v: int = 300, lo: float = -8.0, hi: float = 8.0):
    """Random (B, V) float32 logits, ties allowed."""
    shape = st.tuples(st.integers(1, max_rows), st.integers(min_v, max_v))
    elems = st.floats(lo, hi, width=32, allow_nan=False)
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=elems))


def run(logits: torch.Tensor, params: list[SamplingParams], prompts=None, outputs=None, eos=()) -> torch.Tensor:
    B = logits.shape[0]
    prompts = prompts if prompts is not None else [[] for _ in range(B)]
    outputs = outputs if outputs is not None else [[] for _ in range(B)]
    return process_logits(logits, params, prompts, outputs, eos)


def kept(x: torch.Tensor) -> np.ndarray:
    return torch.isfinite(x).numpy()


# ---------------------------------------------------------------- references (plain loops, float64)


def ref_top_k(row: np.ndarray, k: int) -> np.ndarray:
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return np.array([v >= kth for v in row.tolist()])


def probs64(row: np.ndarray) -> np.ndarray:
    r = row.astype(np.float64)
    finite = np.isfinite(r)
    e = np.where(finite, np.exp(r - r[finite].max()), 0.0)
    return e / e.sum()


def ref_top_p_bounds(row: np.ndarray, p: float, tol: float) -> tuple[int, int]:
    """Sizes of the smallest sorted prefix with mass >= p - tol and >= p + tol (capped at #finite)."""
    pr = np.sort(probs64(row))[::-1]
    cum = np.cumsum(pr)
    n_finite = int(np.isfinite(row).sum())
    lo = min(int(np.argmax(cum >= p - tol)) + 1 if (cum >= p - tol).any() else n_finite, n_finite)
    hi = min(int(np.argmax(cum >= p + tol)) + 1 if (cum >= p + tol).any() else n_finite, n_finite)
    return lo, hi


def ref_penalties(
    row: list[float], p: SamplingParams, prompt: list[int], output: list[int], eos: list[int]
) -> list[float]:
    """bias, min_tokens, repetition, presence/frequency, temperature: one token at a time."""
    x = list(row)
    for t, b in p.logit_bias:
        x[t] += b
    if len(output) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else eos):
            x[t] = NEG_INF
    for t in set(prompt) | set(output):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    counts = Counter(output)
    for t, c in counts.items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if not p.greedy:
        x = [v / p.temperature for v in x]
    return x


# ---------------------------------------------------------------- greedy


@PROPS
@given(logits_arrays(), st.sampled_from([0.0, GREEDY_EPS / 2]), st.integers(0, 5), st.floats(0.05, 1.0))
def test_greedy_is_argmax_and_ignores_filters(a: np.ndarray, temp: float, k: int, top_p: float) -> None:
    x = torch.from_numpy(a)
    params = [SamplingParams(temperature=temp, top_k=k, top_p=top_p, min_p=0.5)] * x.shape[0]
    out = run(x, params)
    assert torch.equal(out, x)  # no temperature, no filters for greedy rows
    assert torch.equal(sample(out, params, [make_generator(0)] * x.shape[0]), x.argmax(-1))


def test_tiny_temperature_picks_argmax_with_clear_max() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 500, generator=g) * 3
    best = torch.randint(0, 500, (64,), generator=g)
    x[torch.arange(64), best] = x.max(-1).values + 1.0  # a clear max, margin 1
    params = [SamplingParams(temperature=2 * GREEDY_EPS)] * 64
    assert not params[0].greedy
    for seed in range(5):
        gens = [make_generator(seed * 100 + i) for i in range(64)]
        assert torch.equal(sample(run(x, params), params, gens), best)


# ---------------------------------------------------------------- seeding and batch independence


def step_logits(step: int, V: int = 257) -> torch.Tensor:
    return torch.randn(1, V, generator=torch.Generator().manual_seed(1000 + step)) * 2


def decode(seed: int, params: SamplingParams, steps: int = 40) -> list[int]:
    g = make_generator(seed)
    out: list[int] = []
    for s in range(steps):
        x = process_logits(step_logits(s), [params], [[1, 2, 3]], [out], [0])
        out.append(int(sample(x, [params], [g])[0]))
    return out


def test_same_seed_same_tokens_different_seeds_differ() -> None:
    p = SamplingParams(temperature=1.0)
    a, b = decode(7, p), decode(7, p)
    assert a == b
    others = [decode(s, p) for s in (8, 9, 10)]
    assert all(o != a for o in others)
    assert len(set(a)) > 5  # really sampling, not stuck on one token


def test_make_generator_streams() -> None:
    draw = lambda g: torch.rand(8, generator=g)  # noqa: E731
    assert torch.equal(draw(make_generator(3)), draw(make_generator(3)))
    assert not torch.equal(draw(make_generator(3)), draw(make_generator(4)))
    assert not torch.equal(draw(make_generator(None)), draw(make_generator(None)))
    assert torch.equal(draw(make_generator(-1)), draw(make_generator(2**64 - 1)))  # any int, mod 2**64


def other_params(i: int) -> SamplingParams:
    choices = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6, min_p=0.05),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((3, 5.0),)),
        SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=(9,)),
    ]
    return choices[i % len(choices)]


@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.8, min_p=0.02),
        SamplingParams(temperature=1.2, top_p=0.97, repetition_penalty=1.2, frequency_penalty=0.4),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
    ],
)
def test_row_is_independent_of_batch(target: SamplingParams) -> None:
    V, steps = 257, 40
    alone = decode(11, target, steps)

    g_target = make_generator(11)
    rng = torch.Generator().manual_seed(5)
    others: dict[int, tuple[SamplingParams, torch.Generator, list[int]]] = {}
    out: list[int] = []
    for s in range(steps):
        # other requests join and leave; the target sits at a varying position in the batch
        if s % 7 == 0:
            others = {
                j: (other_params(j + s), make_generator(j), [])
                for j in range(int(torch.randint(0, 6, (1,), generator=rng)))
            }
        pos = s % (len(others) + 1)
        rows = [(p, g, o, torch.randn(1, V, generator=rng) * 2) for p, g, o in others.values()]
        rows.insert(pos, (target, g_target, out, step_logits(s, V)))
        x = torch.cat([r[3] for r in rows])
        params = [r[0] for r in rows]
        processed = process_logits(x, params, [[1, 2, 3]] * len(rows), [r[2] for r in rows], [0])
        solo = process_logits(step_logits(s, V), [target], [[1, 2, 3]], [out], [0])
        assert torch.equal(processed[pos : pos + 1], solo)
        toks = sample(processed, params, [r[1] for r in rows]).tolist()
        for r, t in zip(rows, toks, strict=True):
            r[2].append(t)
    assert out == alone


@st.composite
def any_params(draw: st.DrawFn, V: int) -> SamplingParams:
    return SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, -1, 1, 3, V + 5])),
        top_p=draw(st.sampled_from([1.0, 0.3, 0.9])),
        min_p=draw(st.sampled_from([0.0, 0.1])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.5, 0.8])),
        presence_penalty=draw(st.sampled_from([0.0, 1.0])),
        frequency_penalty=draw(st.sampled_from([0.0, -0.5])),
        logit_bias=draw(st.sampled_from([(), ((0, 3.0),), ((1, -100.0), (V - 1, 2.5))])),
        min_tokens=draw(st.sampled_from([0, 2])),
        stop_token_ids=draw(st.sampled_from([(), (2,)])),
        ignore_eos=draw(st.booleans()),
    )


@PROPS
@given(st.data())
def test_process_logits_rows_are_independent(data: st.DataObject) -> None:
    a = data.draw(logits_arrays(max_rows=5, min_v=4, max_v=400))
    B, V = a.shape
    params = [data.draw(any_params(V)) for _ in range(B)]
    ids = st.lists(st.integers(0, V + 3), max_size=8)  # ids past the vocabulary are ignored
    prompts = [data.draw(ids) for _ in range(B)]
    outputs = [data.draw(ids) for _ in range(B)]
    x = torch.from_numpy(a)
    batched = process_logits(x, params, prompts, outputs, [1])
    for i in range(B):
        solo = process_logits(x[i : i + 1], params[i : i + 1], prompts[i : i + 1], outputs[i : i + 1], [1])
        assert torch.equal(batched[i : i + 1], solo)
    assert torch.equal(x, torch.from_numpy(a))  # input untouched
    gens = [make_generator(i) for i in range(B)]
    toks = sample(batched, params, gens)
    assert torch.isfinite(batched[torch.arange(B), toks]).all()  # never a masked token


def test_process_logits_accepts_views_and_low_precision() -> None:
    g = torch.Generator().manual_seed(2)
    p = SamplingParams(temperature=0.8, top_k=9, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.4)
    params, prompts, outputs = [p] * 3, [[1, 2]] * 3, [[2, 5, 5]] * 3
    full = torch.randn(3, 4, 40, generator=g)
    last = full[:, -1, :]  # (B, V) view with a row stride of 4 * V
    transposed = torch.randn(40, 3, generator=g).t()  # (B, V) view, column-major
    for view in (last, transposed):
        before = view.clone()
        expect = process_logits(view.contiguous(), params, prompts, outputs)
        assert torch.equal(process_logits(view, params, prompts, outputs), expect)
        assert torch.equal(view, before)
    half = last.to(torch.bfloat16)
    out = process_logits(half, params, prompts, outputs)
    assert out.dtype == torch.float32
    assert torch.equal(out, process_logits(half.float(), params, prompts, outputs))


@PROPS
@given(st.data())
def test_greedy_ids_is_argmax_with_ties_nan_and_inf(data: st.DataObject) -> None:
    B, V = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 300))
    # few distinct values: ties everywhere, and rows of -inf only
    values = st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("inf"), float("-inf"), float("nan")])
    a = np.array(data.draw(st.lists(values, min_size=B * V, max_size=B * V)), dtype=np.float32).reshape(B, V)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.from_numpy(a).to(dtype)
        assert torch.equal(greedy_ids(x), x.argmax(dim=-1))
        assert torch.equal(greedy_ids(x.t().contiguous().t()), x.argmax(dim=-1))  # a column-major view


def test_process_logits_of_plain_rows_is_the_float32_input() -> None:
    g = torch.Generator().manual_seed(3)
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(min_tokens=2)]
    x = torch.randn(3, 50, generator=g)
    out = process_logits(x, plain, [[1]] * 3, [[4, 5]] * 3, [1])  # min_tokens met: nothing applies
    assert out is x  # no copy where nothing changes
    half = x.to(torch.bfloat16)
    out = process_logits(half, plain, [[1]] * 3, [[4, 5]] * 3, [1])
    assert out.dtype == torch.float32 and torch.equal(out, half.float())
    view = torch.randn(50, 3, generator=g).t()  # (3, 50) column-major
    out = process_logits(view, plain, [[1]] * 3, [[4, 5]] * 3, [1])
    assert out.is_contiguous() and torch.equal(out, view)
    before = x.clone()
    out = process_logits(x, plain, [[1]] * 3, [[4]] * 3, [1])  # row 2's min_tokens masks EOS: a copy changes
    assert out is not x and torch.equal(x, before) and out[2, 1] == NEG_INF and torch.equal(out[:2], x[:2])


# ---------------------------------------------------------------- filters against references


@PROPS
@given(logits_arrays(), st.data())
def test_top_k_keeps_k_largest(a: np.ndarray, data: st.DataObject) -> None:
    V = a.shape[1]
    ks = [data.draw(st.integers(1, V + 2)) for _ in range(a.shape[0])]
    out = run(torch.from_numpy(a), [SamplingParams(top_k=k) for k in ks])
    for i, k in enumerate(ks):
        expect = ref_top_k(a[i], min(k, V))
        assert (kept(out[i]) == expect).all()
        assert torch.equal(out[i][kept(out[i])], torch.from_numpy(a[i][expect]))  # kept values unchanged
        if len(set(a[i].tolist())) == V:
            assert expect.sum() == min(k, V)  # exactly k without ties


def check_top_p(row: np.ndarray, out: torch.Tensor, p: float, tol: float = 1e-5) -> None:
    keep, finite = kept(out), np.isfinite(row)
    assert keep.sum() >= 1
    assert (keep <= finite).all()
    assert row[keep].min() > row[finite & ~keep].max(initial=NEG_INF)  # an upper set of the logits
    pr = probs64(row)
    boundary = row[keep].min()
    assert pr[keep].sum() >= p - tol  # enough mass
    assert pr[keep & (row > boundary)].sum() < p + tol  # and minimal, up to ties at the boundary
    lo, hi = ref_top_p_bounds(row, p, tol)
    n_tied = int((row == boundary).sum())
    assert lo <= keep.sum() <= hi + n_tied - 1


@PROPS
@given(logits_arrays(lo=-3.0, hi=3.0), st.data())
def test_top_p_keeps_smallest_prefix_reaching_p(a: np.ndarray, data: st.DataObject) -> None:
    ps = [data.draw(st.floats(0.01, 0.999)) for _ in range(a.shape[0])]
    out = run(torch.from_numpy(a), [SamplingParams(top_p=p) for p in ps])
    for i, p in enumerate(ps):
        check_top_p(a[i], out[i], p)


@PROPS
@given(logits_arrays(), st.data())
def test_top_p_after_top_k_renormalises(a: np.ndarray, data: st.DataObject) -> None:
    B, V = a.shape
    ks = [data.draw(st.integers(1, V)) for _ in range(B)]
    ps = [data.draw(st.floats(0.05, 0.99)) for _ in range(B)]
    out = run(torch.from_numpy(a), [SamplingParams(top_k=k, top_p=p) for k, p in zip(ks, ps, strict=True)])
    for i in range(B):
        after_k = np.where(ref_top_k(a[i], ks[i]), a[i], np.float32(NEG_INF))
        check_top_p(after_k, out[i], ps[i])


@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0])
def test_top_p_large_vocab_matches_full_sort_reference(scale: float) -> None:
    # flat distributions put the nucleus beyond the first top-k rounds and into the full sort
    V = 5000
    a = (torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * scale).numpy()
    ps = [0.5, 0.9, 0.995]
    out = run(torch.from_numpy(a), [SamplingParams(top_p=p) for p in ps])
    for i, p in enumerate(ps):
        check_top_p(a[i], out[i], p)


@PROPS
@given(logits_arrays(), st.data())
def test_min_p_keeps_prob_at_least_min_p_times_max(a: np.ndarray, data: st.DataObject) -> None:
    mps = [data.draw(st.floats(0.0, 1.0)) for _ in range(a.shape[0])]
    out = run(torch.from_numpy(a), [SamplingParams(min_p=m) for m in mps])
    for i, m in enumerate(mps):
        pr = probs64(a[i])
        ratio = pr / pr.max()
        clear = np.abs(ratio - m) > 1e-5 * max(m, 1e-30)
        assert (kept(out[i])[clear] == (ratio >= m)[clear]).all()
        assert kept(out[i])[np.argmax(a[i])]


def test_temperature_scales_logits() -> None:
    x = torch.randn(3, 50)
    params = [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0)]
    out = run(x, params)
    torch.testing.assert_close(out, x / torch.tensor([[0.5], [1.0], [2.0]]), rtol=0, atol=0)


# ---------------------------------------------------------------- penalties, bias, min_tokens


@PROPS
@given(
    logits_arrays(max_rows=3, max_v=40),
    st.floats(0.1, 3.0),
    st.lists(st.integers(0, 39), max_size=10),
    st.lists(st.integers(0, 39), max_size=10),
)
def test_repetition_penalty_matches_transformers(a: np.ndarray, pen: float, prompt, output) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    B, V = a.shape
    prompt = [t % V for t in prompt] or [0]
    output = [t % V for t in output]
    x = torch.from_numpy(a)
    ids = torch.tensor([prompt + output] * B)
    expect = RepetitionPenaltyLogitsProcessor(penalty=pen)(ids, x.clone())
    got = run(x, [SamplingParams(repetition_penalty=pen)] * B, [prompt] * B, [output] * B)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


@PROPS
@given(st.data())
def test_penalties_bias_min_tokens_match_loop_reference(data: st.DataObject) -> None:
    a = data.draw(logits_arrays(max_rows=4, min_v=4, max_v=60))
    B, V = a.shape
    eos = [V - 1]
    ids = st.lists(st.integers(0, V - 1), max_size=12)
    params, prompts, outputs = [], [], []
    for _ in range(B):
        bias_tokens = data.draw(st.lists(st.integers(0, V - 1), unique=True, max_size=3))
        params.append(
            SamplingParams(
                temperature=data.draw(st.sampled_from([0.0, 0.6, 1.0, 1.5])),
                repetition_penalty=data.draw(st.floats(0.5, 2.0)),
                presence_penalty=data.draw(st.floats(-2.0, 2.0)),
                frequency_penalty=data.draw(st.floats(-2.0, 2.0)),
                logit_bias=tuple((t, data.draw(st.floats(-100.0, 100.0))) for t in bias_tokens),
                min_tokens=data.draw(st.integers(0, 5)),
                stop_token_ids=tuple(data.draw(st.lists(st.integers(0, V - 1), max_size=2))),
                ignore_eos=data.draw(st.booleans()),
            )
        )
        prompts.append(data.draw(ids))
        outputs.append(data.draw(ids))
    got = process_logits(torch.from_numpy(a), params, prompts, outputs, eos)
    for i in range(B):
        expect = ref_penalties(a[i].tolist(), params[i], prompts[i], outputs[i], eos)
        torch.testing.assert_close(got[i], torch.tensor(expect, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_presence_and_frequency_count_output_tokens_only() -> None:
    x = torch.zeros(1, 6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = run(x, [p], [[0, 0, 1]], [[1, 2, 2, 2]])
    assert out[0].tolist() == [0.0, -0.75, -1.25, 0.0, 0.0, 0.0]


def test_logit_bias_shifts_exactly_and_can_force_or_ban_tokens() -> None:
    x = torch.randn(1, 30, generator=torch.Generator().manual_seed(0))
    x[0, 11] = 50.0  # the clear favourite, banned below
    forced = SamplingParams(logit_bias=((7, 100.0), (11, -100.0)))
    out = run(x, [forced])
    assert out[0, 7] == x[0, 7] + 100.0 and out[0, 11] == -50.0
    assert torch.equal(
        out[0, [i for i in range(30) if i not in (7, 11)]], x[0, [i for i in range(30) if i not in (7, 11)]]
    )
    for seed in range(20):
        assert int(sample(out, [forced], [make_generator(seed)])[0]) == 7


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    x = torch.zeros(1, 10)
    p = SamplingParams(min_tokens=3, stop_token_ids=(4, 5))
    for n_out in range(5):
        out = run(x, [p], outputs=[[1] * n_out], eos=[9])
        masked = {i for i in range(10) if out[0, i] == NEG_INF}
        assert masked == ({4, 5, 9} if n_out < 3 else set())
    ign = run(x, [replace(p, ignore_eos=True)], outputs=[[]], eos=[9])
    assert {i for i in range(10) if ign[0, i] == NEG_INF} == {4, 5}


# ---------------------------------------------------------------- empirical distribution


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float((((counts - expected) ** 2) / expected).sum())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=6),
        SamplingParams(temperature=1.0, top_p=0.8, seed=3),
    ],
)
def test_empirical_distribution_matches_softmax(params: SamplingParams) -> None:
    V, n_rows, n_steps = 10, 4000, 10
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.8, -2.0]])
    processed = run(logits, [params])
    probs = torch.softmax(processed[0].double(), -1).numpy()
    g = make_generator(params.seed if params.seed is not None else 1234)
    batch = processed.expand(n_rows, V)
    counts = np.zeros(V)
    for _ in range(n_steps):
        toks = sample(batch, [params] * n_rows, [g] * n_rows)
        counts += np.bincount(toks.numpy(), minlength=V)
    support = probs > 0
    assert counts[~support].sum() == 0  # masked tokens are never drawn
    dof = int(support.sum()) - 1
    # 0.1% critical values of chi-square for these degrees of freedom
    critical = {9: 27.88, 5: 20.52, 4: 18.47, 3: 16.27, 2: 13.82}[dof]
    assert chi_square(counts[support], probs[support]) < critical


def test_sample_without_generator_uses_global_rng() -> None:
    x = torch.zeros(2, 1000)
    params = [SamplingParams()] * 2
    torch.manual_seed(0)
    a = sample(x, params, [None, None])
    torch.manual_seed(0)
    assert torch.equal(a, sample(x, params, [None, None]))
    assert a.dtype == torch.int64 and a.shape == (2,)


# ---------------------------------------------------------------- logprobs


@PROPS
@given(logits_arrays(max_rows=4, min_v=3, max_v=100), st.data())
def test_compute_logprobs_equals_log_softmax(a: np.ndarray, data: st.DataObject) -> None:
    B, V = a.shape
    x = torch.from_numpy(a)
    toks = torch.tensor([data.draw(st.integers(0, V - 1)) for _ in range(B)])
    top_n = [data.draw(st.integers(0, min(20, V))) for _ in range(B)]
    ref = torch.log_softmax(x, -1)
    res = compute_logprobs(x, toks, top_n)
    assert len(res) == B
    for i, (chosen, top) in enumerate(res):
        assert chosen == float(ref[i, toks[i]])
        assert len(top) == top_n[i]
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert all(v == float(ref[i, t]) for t, v in top)
        assert len({t for t, _ in top}) == len(top)
        if top:
            assert values == sorted(ref[i].tolist(), reverse=True)[: top_n[i]]


def test_compute_logprobs_uses_raw_distribution_in_any_dtype() -> None:
    x = torch.randn(2, 64).to(torch.bfloat16)
    res = compute_logprobs(x, torch.tensor([3, 5]), [0, 2])
    ref = torch.log_softmax(x.float(), -1)
    assert res[0] == (float(ref[0, 3]), [])
    assert math.isclose(sum(math.exp(v) for v in ref[1].tolist()), 1.0, rel_tol=1e-5)
    assert [t for t, _ in res[1][1]] == ref[1].topk(2).indices.tolist()


# ---------------------------------------------------------------- validation (the one check of what fields mean)


@pytest.mark.parametrize(
    ("field", "value", "error_field"),
    [
        ("max_tokens", -1, "max_tokens"),
        ("max_tokens", 1.5, "max_tokens"),
        ("temperature", -0.1, "temperature"),
        ("temperature", 2.01, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("temperature", float("inf"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.01, "top_p"),
        ("top_k", -2, "top_k"),
        ("top_k", 2.0, "top_k"),
        ("min_p", -0.01, "min_p"),
        ("min_p", 1.5, "min_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("repetition_penalty", -1.0, "repetition_penalty"),
        ("repetition_penalty", 2.5, "repetition_penalty"),
        ("repetition_penalty", float("nan"), "repetition_penalty"),
        ("presence_penalty", 2.01, "presence_penalty"),
        ("presence_penalty", float("nan"), "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("logit_bias", ((1, 101.0),), "logit_bias"),
        ("logit_bias", ((1, float("nan")),), "logit_bias"),
        ("logit_bias", ((-1, 1.0),), "logit_bias"),
        ("logit_bias", ((1, 1.0), (1, 2.0)), "logit_bias"),
        ("logit_bias", ((1, 1.0, 2.0),), "logit_bias"),
        ("seed", 1.5, "seed"),
        ("stop", ("",), "stop"),
        ("stop", "x", "stop"),
        ("stop_token_ids", (-3,), "stop_token_ids"),
        ("stop_token_ids", (True,), "stop_token_ids"),
        ("logprobs", 21, "logprobs"),
        ("logprobs", -1, "logprobs"),
        ("logprobs", 2.0, "logprobs"),
        ("prompt_logprobs", 21, "prompt_logprobs"),
        ("min_tokens", -1, "min_tokens"),
        ("min_tokens", 17, "min_tokens"),  # above the default max_tokens=16
        ("ignore_eos", 1, "ignore_eos"),
    ],
)
def test_validate_rejects_out_of_range(field: str, value: Any, error_field: str) -> None:
    with pytest.raises(SamplingParamsError, match=field) as e:
        replace(SamplingParams(), **{field: value}).validate()
    assert e.value.field == error_field
    assert isinstance(e.value, ValueError)
    assert "must be" in str(e.value) and "got" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 2.5, "temperature must be in [0.0, 2.0], got 2.5"),
        ("top_p", 0.0, "top_p must be in (0.0, 1.0], got 0.0"),
        ("repetition_penalty", 2.5, "repetition_penalty must be in (0.0, 2.0], got 2.5"),
        ("presence_penalty", -3.0, "presence_penalty must be in [-2.0, 2.0], got -3.0"),
        ("logit_bias", ((5, 500.0),), "logit_bias values must be in [-100.0, 100.0], got 500.0"),
        ("logprobs", 21, "logprobs must be None or an int in [0, 20], got 21"),
        ("min_tokens", 50, "min_tokens must be an int in [0, max_tokens=16], got 50"),
    ],
)
def test_validate_messages_name_field_range_and_value(field: str, value: Any, message: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        replace(SamplingParams(), **{field: value}).validate()
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("field", "value"),
    [("logit_bias", ((100, 1.0),)), ("stop_token_ids", (5, 100)), ("top_k", 101)],
)
def test_validate_checks_token_ids_against_vocab(field: str, value: Any) -> None:
    p = replace(SamplingParams(), **{field: value})
    p.validate()
    with pytest.raises(SamplingParamsError, match=rf"{field}.*\[[01], 100[\])]") as e:
        p.validate(vocab_size=100)
    assert e.value.field == field


def test_validate_accepts_edges() -> None:
    for p in [
        SamplingParams(),
        SamplingParams(max_tokens=0),  # the engine scores the prompt only
        SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=20, seed=-5),
        SamplingParams(temperature=2.0, top_k=10, min_p=0.0, repetition_penalty=2.0, seed=2**70),
        SamplingParams(repetition_penalty=1e-9, top_p=1e-9, prompt_logprobs=0),
        SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, logit_bias=((0, -100.0), (9, 100.0))),
        SamplingParams(max_tokens=1, min_tokens=1, stop=("\n",), stop_token_ids=(0, 9), logprobs=0),
        SamplingParams(max_tokens=0, min_tokens=0, prompt_logprobs=20),
        SamplingParams(logit_bias=[(3, 1.0)], stop=["x"]),  # type: ignore[arg-type]  # lists are normalised to tuples
    ]:
        p.validate(vocab_size=10)
        hash(p)


def test_generate_needs_max_tokens_of_at_least_one() -> None:
    """validate() takes max_tokens=0 (the engine scores the prompt only); the reference generate() refuses it."""
    SamplingParams(max_tokens=0).validate()
    with pytest.raises(ValueError, match="max_tokens"):
        next(generate(tiny_llama(vocab_size=64, max_seq_len=16), [1, 2], SamplingParams(max_tokens=0)))


# ---------------------------------------------------------------- CUDA (run with -m gpu on a GPU machine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(4)
    params = [other_params(i) for i in range(6)] + [SamplingParams(temperature=0.9, top_p=0.95)]
    B, V = len(params), 3000
    prompts, outputs = [[1, 2, 3]] * B, [[4, 4, 7]] * B
    cpu_gens = [make_generator(i) for i in range(B)]
    cuda_gens = [make_generator(i) for i in range(B)]  # CPU generators drive CUDA logits too
    for _ in range(10):
        x = torch.randn(B, V, generator=g) * 3
        on_cpu = process_logits(x, params, prompts, outputs, [0])
        on_gpu = process_logits(x.cuda(), params, prompts, outputs, [0])
        assert torch.equal(torch.isfinite(on_gpu).cpu(), torch.isfinite(on_cpu))
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
        assert torch.equal(sample(on_gpu, params, cuda_gens).cpu(), sample(on_cpu, params, cpu_gens))
    x = torch.randn(B, V, generator=g).cuda()
    a = sample(x, params, [make_generator(9, "cuda") for _ in range(B)])
    assert torch.equal(a, sample(x, params, [make_generator(9, "cuda") for _ in range(B)]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**31 - 1), st.floats(0.0, 0.95))
def test_two_level_inverse_cdf_equals_full_prefix_sum(V: int, seed: int, zero_frac: float) -> None:
    from model_core.sampling import _inverse_cdf

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 3
    logits[torch.rand(4, V, generator=g) < zero_frac] = float("-inf")
    logits[:, int(torch.randint(0, V, (1,), generator=g))] = 0.0  # every row keeps some mass
    probs = torch.softmax(logits, dim=-1)
    u = torch.rand(4, dtype=torch.float64, generator=g)
    got = _inverse_cdf(probs, u)
    cum = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    r = u * cum[:, -1]
    ref = torch.searchsorted(cum, r.unsqueeze(1), right=True).squeeze(1).clamp(max=V - 1)
    for b in range(4):
        assert probs[b, got[b]] > 0, "a token with zero probability was drawn"
        if got[b] != ref[b]:  # only a float rounding tie at a boundary may differ
            assert abs(float(cum[b, min(int(got[b]), int(ref[b]))]) - float(r[b])) < 1e-6

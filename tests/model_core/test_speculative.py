"""The speculative acceptance rule (model_core.speculative): greedy verification keeps exactly what one-at-a-time
greedy decoding makes, and under sampling every kept token is distributed as the model's own next-token
distribution (chi-square tests over many seeded draws, against the exact probabilities)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_core.sampling import SamplingParams, make_generator, process_logits
from model_core.speculative import accept_draft

V = 6


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-3, 3), min_size=V, max_size=V), min_size=1, max_size=5),
    data=st.data(),
)
def test_greedy_keeps_the_argmax_chain(rows: list[list[int]], data: st.DataObject) -> None:
    logits = torch.tensor(rows, dtype=torch.float32)  # (k + 1, V), ties included
    k = len(rows) - 1
    draft = data.draw(st.lists(st.integers(0, V - 1), min_size=k, max_size=k))
    kept = accept_draft(logits, draft, SamplingParams(temperature=0.0), None)
    best = logits.argmax(dim=-1).tolist()
    n = next((j for j in range(k) if draft[j] != best[j]), k)  # draft tokens that are the argmax of their row
    assert kept == draft[:n] + [best[n]]


CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52]  # 99.9% quantiles of chi-square with 1..5 degrees of freedom


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom over the cells expecting >= 5 draws (the rest pooled)."""
    expected = probs * float(counts.sum())
    big = expected >= 5
    stat = float((((counts[big] - expected[big]) ** 2) / expected[big]).sum())
    cells = int(big.sum())
    rest_e, rest_o = float(expected[~big].sum()), float(counts[~big].sum())
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        cells += 1
    return stat, cells - 1


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4), SamplingParams(top_p=0.8)],
    ids=["t1", "t0.7-topk4", "topp0.8"],
)
def test_sampled_tokens_follow_the_models_distribution(params: SamplingParams) -> None:
    torch.manual_seed(0)
    raw = torch.randn(3, V) * 1.5  # rows 0, 1, 2: after the sequence, after d1, after d1 d2
    draft = [int(raw[0].argsort()[-2]), int(raw[1].argmax())]  # a likely-ish token, then the likeliest
    processed = process_logits(raw, [params] * 3, [[0]] * 3, [[], [draft[0]], draft])
    p = torch.softmax(processed, dim=-1)  # (3, V) the model's distributions
    draws = 6000
    first = torch.zeros(V)
    second = torch.zeros(V)  # second token, given the first was d1
    gen = make_generator(1234)
    for _ in range(draws):
        kept = accept_draft(processed, draft, params, gen)
        assert 1 <= len(kept) <= 3 and kept[: len(kept) - 1] == draft[: len(kept) - 1]
        first[kept[0]] += 1
        if kept[0] == draft[0]:
            second[kept[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        stat, dof = _chi_square(counts, probs)
        assert stat < CHI2_999[dof - 1], (counts, probs)
        assert counts[probs == 0].sum() == 0  # nothing the processing masked is ever kept
    assert second.sum() > 500  # the draft's first token was accepted often enough to test the second


def test_a_draft_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="need 3"):
        accept_draft(torch.zeros(2, V), [1, 2], SamplingParams(temperature=0.0), None)

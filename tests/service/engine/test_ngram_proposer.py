"""The n-gram proposer against a brute-force search, fed token by token as the engine feeds it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.ngram_proposer import NgramProposer


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the last n tokens, longest n first."""
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = tokens[L - n :]
        for end in range(L - 1, n - 1, -1):  # an occurrence ending at end - 1 < L - 1
            if tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    outputs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), max_size=12),
    min_n=st.integers(1, 3),
    extra=st.integers(0, 2),
    k=st.integers(0, 6),
)
def test_proposals_equal_a_brute_force_search(
    prompt: list[int], outputs: list[list[int]], min_n: int, extra: int, k: int
) -> None:
    p = NgramProposer(min_n, min_n + extra, prompt)
    tokens = list(prompt)
    assert p.propose(k) == brute_force(tokens, min_n, min_n + extra, k)
    for step in outputs:  # the tokens a step kept (one, or a draft's prefix and one more)
        p.extend(step)
        tokens += step
        assert p.propose(k) == brute_force(tokens, min_n, min_n + extra, k)


def test_a_copied_span_is_proposed() -> None:
    p = NgramProposer(2, 4, [10, 11, 12, 13, 14, 15, 99, 10, 11])
    assert p.propose(3) == [12, 13, 14]
    p.extend([12, 13])
    assert p.propose(8) == [14, 15, 99, 10, 11, 12, 13]  # up to the end of the sequence
    assert NgramProposer(2, 4, [1, 2, 3]).propose(4) == []  # nothing repeats


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(0, 2)

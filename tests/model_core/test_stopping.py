"""Stop strings on streamed text, as properties: for any text, any stop strings and any chunking of
the text, what `StopStringMatcher` and `OutputStream` emit never contains a stop string and equals the
text cut at the first stop string to complete (the one ending earliest; on a tie, the longest)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from model_core.stopping import OutputStream, StopStringMatcher
from model_core.tokenizer import Tokenizer

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# a small alphabet makes stop strings occur (and nearly occur) often; a few multi-byte characters too
ALPHABET = "ab c\né"
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


def reference(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Non-streaming oracle: (text cut before the first stop string to complete, that stop or None)."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for s in stops:
        i = text.find(s)  # for one string, its first occurrence is also the one ending first
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    if best is None:
        return text, None
    return text[: best[1]], best[2]


def split(text: str, cuts: Sequence[int]) -> list[str]:
    """`text` cut at the given positions (any order, duplicates allowed: empty chunks)."""
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run_matcher(chunks: Sequence[str], stops: Sequence[str]) -> tuple[list[str], StopStringMatcher]:
    m = StopStringMatcher(stops)
    out = [m.feed(c) for c in chunks]
    out.append(m.flush())
    return out, m


# ------------------------------------------------------------------------------- StopStringMatcher
@PROPS
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 64), max_size=12))
def test_any_chunking_equals_the_reference_truncation(text: str, stops: list[str], cuts: list[int]) -> None:
    pieces, m = run_matcher(split(text, cuts), stops)
    expected, matched = reference(text, stops)
    assert "".join(pieces) == expected
    assert m.stopped == (matched is not None)
    assert m.matched == matched
    for s in stops:
        assert s not in "".join(pieces)


@PROPS
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 64), max_size=12))
def test_emitted_text_is_never_taken_back(text: str, stops: list[str], cuts: list[int]) -> None:
    """Every prefix of the output already emitted is a prefix of the final answer, and no stop string
    can be completed by text emitted so far: held-back text is exactly what could still start one."""
    expected, _ = reference(text, stops)
    m = StopStringMatcher(stops)
    emitted = ""
    fed = ""
    for chunk in split(text, cuts):
        emitted += m.feed(chunk)
        fed += chunk
        assert expected.startswith(emitted)
        assert fed.startswith(emitted)
        if not m.stopped:
            held = fed[len(emitted) :]
            # what is held back is the longest suffix that is a proper prefix of some stop string
            longest = max((n for s in stops for n in range(1, len(s)) if fed.endswith(s[:n])), default=0)
            assert len(held) == min(longest, len(fed))


@PROPS
@given(text=texts, cuts=st.lists(st.integers(0, 64), max_size=12))
def test_no_stop_strings_pass_everything_through_at_once(text: str, cuts: list[int]) -> None:
    m = StopStringMatcher([])
    for chunk in split(text, cuts):
        assert m.feed(chunk) == chunk
    assert m.flush() == "" and not m.stopped


def test_feed_after_stop_emits_nothing() -> None:
    m = StopStringMatcher(["xy"])
    assert m.feed("abx") == "ab"
    assert m.feed("yz") == ""
    assert m.stopped and m.matched == "xy"
    assert m.feed("more") == "" and m.flush() == ""


def test_a_stop_ending_first_wins_over_one_starting_first() -> None:
    """ "abc" starts before "b" but "b" completes first: streaming and one-shot feeding agree."""
    assert run_matcher(["abc"], ["abc", "b"])[0][0] == "a"
    assert "".join(run_matcher(list("abc"), ["abc", "b"])[0]) == "a"
    assert "".join(run_matcher(["ab", "ab"], ["ab", "bab"])[0]) == ""


# ------------------------------------------------------------------------------------ OutputStream
class PieceDetokenizer:
    """Token i yields pieces[i] (possibly empty); flush() yields `tail`, like held-back UTF-8 bytes."""

    def __init__(self, pieces: Sequence[str], tail: str = "") -> None:
        self.pieces, self.tail = pieces, tail

    def step(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        out, self.tail = self.tail, ""
        return out


def run_stream(stream: OutputStream, ids: Sequence[int]) -> tuple[list[str], str | None, int]:
    """Feed ids until the stream finishes; returns (texts, finish reason, tokens consumed)."""
    texts: list[str] = []
    for n, t in enumerate(ids, start=1):
        text, finish = stream.step(t)
        texts.append(text)
        if finish is not None:
            return texts, finish, n
    return texts, None, len(ids)


@PROPS
@given(
    pieces=st.lists(st.text(alphabet=ALPHABET, max_size=4), min_size=1, max_size=15),
    tail=texts,
    stops=stop_lists,
    extra=st.integers(0, 5),
)
def test_output_stream_stops_at_the_token_completing_the_stop(
    pieces: list[str], tail: str, stops: list[str], extra: int
) -> None:
    ids = list(range(len(pieces)))
    max_new = len(ids) + extra  # may end by length only when there is no extra room
    stream = OutputStream(max_new, stops, (), PieceDetokenizer(pieces, tail))
    texts, finish, used = run_stream(stream, ids)
    full = "".join(pieces)
    expected, matched = reference(full, stops)
    if matched is not None:
        # the stop completes inside the token whose piece reaches its end
        end = len(expected) + len(matched)
        cum = [sum(len(p) for p in pieces[:n]) for n in range(1, len(pieces) + 1)]
        completing = next(n for n, c in enumerate(cum, start=1) if c >= end)
        assert finish == "stop" and used == completing
        assert "".join(texts) == expected == stream.text
    elif extra == 0:
        assert finish in ("length", "stop") and used == len(ids)
        # at the end the detokenizer's tail is released, and may itself complete a stop string
        assert "".join(texts) == reference(full + tail, stops)[0] == stream.text
        assert (finish == "stop") == (reference(full + tail, stops)[1] is not None)
    else:
        assert finish is None and used == len(ids)
        assert "".join(texts) + stream.finish_text() == reference(full + tail, stops)[0]
    for s in stops:
        assert s not in stream.text


@PROPS
@given(pieces=st.lists(st.text(alphabet=ALPHABET, max_size=3), min_size=1, max_size=10), data=st.data())
def test_stop_token_ids_end_the_stream_without_text(pieces: list[str], data: st.DataObject) -> None:
    stop_at = data.draw(st.integers(0, len(pieces) - 1))
    ids = list(range(len(pieces)))
    stream = OutputStream(len(ids) + 1, (), (stop_at,), PieceDetokenizer(pieces, tail="!"))
    texts, finish, used = run_stream(stream, ids)
    assert finish == "stop" and used == stop_at + 1
    assert texts[-1] == "!"  # the stop token adds no text; held-back text is released
    assert "".join(texts) == "".join(pieces[:stop_at]) + "!"


@PROPS
@given(n=st.integers(1, 20), max_new=st.integers(1, 20))
def test_ids_only_stream_counts_tokens(n: int, max_new: int) -> None:
    stream = OutputStream(max_new)
    texts, finish, used = run_stream(stream, [7] * n)
    assert used == min(n, max_new)
    assert finish == ("length" if n >= max_new else None)
    assert texts == [""] * used


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer: Tokenizer) -> Tokenizer:
    return smol_tokenizer


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet="ab c.\né東🚀", min_size=1, max_size=40),
    stops=st.lists(st.text(alphabet="ab c.é東🚀", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_real_detokenizer_stream_equals_reference(tokenizer: Tokenizer, text: str, stops: list[str]) -> None:
    """Byte-level BPE tokens split multi-byte characters: the streamed text still equals the oracle."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assume(ids and tokenizer.decode(ids) == text)
    stream = OutputStream(len(ids), stops, (), tokenizer.incremental_decoder())
    texts, finish, _ = run_stream(stream, ids)
    expected, matched = reference(text, stops)
    assert "".join(texts) == expected
    assert finish == ("stop" if matched is not None else "length")

"""N-gram lookup proposals for speculative decoding ("prompt lookup"): guess the next tokens by finding the
sequence's last n tokens earlier in its prompt or output and copying what followed them there.

No model runs: chat over documents, code edits and extraction copy long spans of their prompt, and the tokens
after an earlier occurrence of the last few tokens are then often the ones the model writes next. The engine
core keeps one `NgramProposer` per request, feeds it every token the request gets (`extend`) and asks it for up
to k tokens before a step (`propose`); the model verifies them (model_core.speculative).

Every n from `max_n` down to `min_n` is tried, longest first; for one n the most recent earlier occurrence wins.
The index of each n maps an n-gram to the position just after its last occurrence, so a lookup costs O(max_n)
whatever the sequence's length, and `extend` O(max_n) a token.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, tokens: Iterable[int] = ()) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # index[n - min_n]: n-gram -> the position after its latest occurrence that ends before the last token
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n - min_n + 1)]
        self._indexed = 0  # the n-grams ending at positions < _indexed are in the index
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """The sequence's next tokens (its prompt first, then each output token as it comes)."""
        self.tokens.extend(int(t) for t in tokens)

    def _catch_up(self) -> None:
        """Index every n-gram that ends before the last token (the one ending at it is what a lookup searches
        for: indexed, it would find itself)."""
        toks = self.tokens
        for end in range(self._indexed, len(toks) - 1):  # the n-gram toks[end - n + 1 .. end] -> end + 1
            for i, n in enumerate(range(self.min_n, self.max_n + 1)):
                if end + 1 >= n:
                    self._index[i][tuple(toks[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(toks) - 1)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens (the longest
        n that has one); [] when none has."""
        if k <= 0:
            return []
        self._catch_up()
        toks, L = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            at = self._index[n - self.min_n].get(tuple(toks[L - n :]))
            if at is not None:
                return toks[at : min(at + k, L)]
        return []

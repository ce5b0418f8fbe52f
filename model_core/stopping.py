"""Stop strings on streamed text: emit only text that cannot be the start of a stop string.

OpenAI semantics: generation ends at the first occurrence of any stop string, and the returned text
excludes it. "First" is the stop string that completes first (ends earliest; on a tie the longest), as
a stream sees it, so the result does not depend on how the text arrives. While streaming, a suffix of
the text that could still grow into a stop string is held back until it either completes one
(dropped, stop) or cannot (released).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add newly decoded text; returns the part that is safe to emit now."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        # the stop string that completes first (ends earliest; on a tie the longest) wins, so the result
        # does not depend on how the text was chunked
        first: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or (i + len(s), i) < first[:2]):
                first = (i + len(s), i, s)
        if first is not None:
            self.stopped, self.matched, self._held = True, first[2], ""
            return buf[: first[1]]
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation (not by a stop string): release what was held back."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out


class OutputStream:
    """Per-request bookkeeping of generated tokens: detokenize, apply stop conditions, decide finish.

    `step(token)` returns (new text, finish reason or None). Shared by the reference generate() and
    the batched engine so that both stop at exactly the same token with exactly the same text.
    """

    def __init__(
        self,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        stop_token_ids: Iterable[int] = (),
        detokenizer: object | None = None,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_token_ids)
        self.detok = detokenizer  # an IncrementalDetokenizer (step/flush), or None for ids only
        self.matcher = StopStringMatcher(stop)
        self.num_tokens = 0
        self.text = ""

    def step(self, token_id: int) -> tuple[str, str | None]:
        self.num_tokens += 1
        finish: str | None = None
        text = ""
        if token_id in self.stop_ids:
            finish = "stop"
        elif self.detok is not None:
            text = self.matcher.feed(self.detok.step(token_id))  # type: ignore[attr-defined]
            if self.matcher.stopped:
                finish = "stop"
        if finish is None and self.num_tokens >= self.max_new_tokens:
            finish = "length"
        if finish is not None and not self.matcher.stopped:
            text += self.finish_text()
            if self.matcher.stopped:
                finish = "stop"
        self.text += text
        return text, finish

    def finish_text(self) -> str:
        """Release held-back bytes and text at the end of the stream (also on abort)."""
        if self.detok is None:
            return ""
        text = self.matcher.feed(self.detok.flush())  # type: ignore[attr-defined]
        return text + self.matcher.flush()

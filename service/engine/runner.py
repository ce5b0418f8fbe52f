"""The model runner: owns the model, the paged KV cache and the device; runs one scheduled step.

A step is a batch of decodes (one token each, one batched forward; a decode with a draft to verify adds a row per
draft token to that forward and keeps the draft's accepted prefix: model_core.speculative) plus prefill chunks,
grouped by length into padded forwards (`prefill_groups`: a group grows while padding stays under a quarter of
its tokens; a batch-invariant model's cache skips the padding, model_core.kv_cache).
A chunk may start anywhere in its sequence (chunked prefill, or a prefix found in the
prefix cache). The logits of every position that must be sampled are then processed and sampled
together in one batched call.

Prompt logprobs (`SamplingParams.prompt_logprobs`, echo with logprobs) come from the same prefill forward that
fills the KV cache (for a batch-invariant model: from an exact pass of their own over the prompt, since its
serving products may round activations to int8): only a group holding a chunk that asks for them keeps the
hidden states of every position, and the lm_head runs over them in slices of `SCORE_ROWS` positions, so no
(prompt_len, V) tensor is ever made.
Each scored position is stored in the request's `prompt_logprobs` list (index i: how the model scored prompt
token i given tokens 0..i-1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model_core.grammar import GrammarMatcher, allocate_bitmask, apply_token_masks, unpack_bitmask
from model_core.lm import CausalLM, Output
from model_core.lora import LoRAAdapter, LoRABatch
from model_core.sampling import SamplingParams, compute_logprobs, process_logits, sample, score_tokens
from model_core.speculative import accept_draft
from service.engine.errors import EngineError, grammar_limit_error, internal_error, invalid_request
from service.engine.model_input import ChunkInput, ModelInput, SamplingState

log = logging.getLogger(__name__)
SCORE_ROWS = 128  # prompt positions whose logits are computed at once when scoring a prompt
MAX_RESAMPLES = 8  # tries for a constrained row whose sampled token the grammar refuses despite its mask


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: EngineError | None = None  # set when this row could not be sampled (token_id is then -1)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.eos_token_ids = eos_token_ids
        self.cache = model.new_cache(num_blocks, block_size)

    def _forward(self, chunks: list[ChunkInput], score: bool = False) -> torch.Tensor:
        """One forward over chunks of possibly different lengths (shorter ones padded).
        Returns the logits at each chunk's last token (B, V). With score, the chunks that ask for prompt
        logprobs get them from this same forward (see `_score_prompt`)."""
        counts = [c.num_tokens for c in chunks]
        T = max(counts)
        ids = [c.token_ids + [0] * (T - c.num_tokens) for c in chunks]
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)  # (B, T)
        step = self.cache.prepare([c.block_table for c in chunks], [c.start for c in chunks], counts)
        lora = LoRABatch.of([c.lora for c in chunks])  # each row's adapter (None: every row the base model)
        if score and self.model.batch_invariant:  # scores from an exact pass of their own; logits as any forward's
            for c in chunks:
                if self.wants_prompt_scores(c):
                    self._score_prompt(c, self._exact_hidden(c), exact=True)
        elif score:
            h = self.model(tokens, self.cache, step, output=Output.HIDDEN, lora=lora)  # (B, T, C), final-normed
            for b, c in enumerate(chunks):
                if self.wants_prompt_scores(c):
                    self._score_prompt(c, h[b, : c.num_tokens])
            last = torch.tensor([n - 1 for n in counts], device=self.device)  # (B,)
            return self.model.project(h[torch.arange(len(chunks), device=self.device), last])  # (B, V)
        if min(counts) == T:
            return self.model(tokens, self.cache, step, Output.LAST, lora=lora)  # (B, V)
        last = torch.tensor([n - 1 for n in counts], device=self.device)  # (B,)
        return self.model(tokens, self.cache, step, Output.at(last), lora=lora)  # (B, V)

    @staticmethod
    def wants_prompt_scores(chunk: ChunkInput) -> bool:
        """The chunk covers prompt positions whose logprobs its request asked for and does not have yet
        (a sequence preempted and recomputed keeps those it has)."""
        scores = chunk.sampling.prompt_scores
        last = min(chunk.end, len(chunk.prompt_ids) - 1)  # the last prompt position it scores
        return scores is not None and chunk.start < last and scores[last] is None

    def _exact_hidden(self, chunk: ChunkInput) -> torch.Tensor:
        """(n, C) final-normed hidden states of the chunk's positions from an exact pass over the prompt up to the
        chunk's end (batch-invariant mode: the serving products may round activations to int8)."""
        end = min(chunk.end, len(chunk.prompt_ids))
        tokens = torch.tensor([chunk.prompt_ids[:end]], dtype=torch.long, device=self.device)  # (1, end)
        return self.model.exact_hidden(tokens, LoRABatch.of([chunk.lora]))[0, chunk.start :]  # (end - start, C)

    def _score_prompt(self, chunk: ChunkInput, h: torch.Tensor, exact: bool = False) -> None:
        """h: (n, C) final-normed hidden states of the chunk's positions. Position p predicts prompt token
        p + 1; the logits are made SCORE_ROWS positions at a time (with exact products where `exact`)."""
        state = chunk.sampling
        scores = state.prompt_scores
        assert scores is not None
        prompt = chunk.prompt_ids
        n = min(chunk.end, len(prompt) - 1) - chunk.start  # positions scored: start .. start + n - 1
        k = state.params.prompt_logprobs or 0
        for i in range(0, n, SCORE_ROWS):
            m = min(SCORE_ROWS, n - i)
            first = chunk.start + i + 1  # the first prompt token this slice scores
            targets = torch.tensor(prompt[first : first + m], dtype=torch.long, device=self.device)  # (m,)
            logits = self.model.project(h[i : i + m], exact)  # (m, V)
            for j, sc in enumerate(score_tokens(logits, targets, k)):
                scores[first + j] = sc

    @staticmethod
    def prefill_groups(chunks: list[ChunkInput], max_waste: float = 0.25) -> list[list[ChunkInput]]:
        """Group prefill chunks of similar length into one padded forward each: sorted by length, a
        group grows while its padding stays under max_waste of its tokens."""
        groups: list[list[ChunkInput]] = []
        for c in sorted(chunks, key=lambda c: c.num_tokens):
            g = groups[-1] if groups else None
            if g is not None:
                padded = (len(g) + 1) * c.num_tokens  # c is the longest so far
                real = sum(x.num_tokens for x in g) + c.num_tokens
                if padded - real <= max_waste * padded:
                    g.append(c)
                    continue
            groups.append([c])
        return groups

    @torch.inference_mode()
    def execute(self, out: ModelInput) -> dict[str, list[SampleResult]]:
        """Run the step; per request sampled, its tokens in order: one, or for a decode with a draft the draft's
        accepted prefix and one more (a failed row: one result with `error`)."""
        rows: list[torch.Tensor] = []
        to_sample: list[ChunkInput] = []
        verified: dict[str, list[SampleResult]] = {}
        decodes, drafted = out.decodes, [c for c in out.decodes if c.draft]
        if drafted:  # the decodes and every draft token as rows of one decode forward
            logits = self._forward_rows(decodes)  # (sum of 1 + len(draft), V)
            at = 0
            plain: list[int] = []
            for c in decodes:
                if c.draft:
                    verified.update(self._verify(logits[at : at + 1 + len(c.draft)], c))
                else:
                    plain.append(at)
                at += 1 + len(c.draft)
            if plain:
                rows.append(logits[plain])
                to_sample.extend(c for c in decodes if not c.draft)
            decodes = []
        forwards = ([decodes] if decodes else []) + self.prefill_groups(out.prefills)
        for group in forwards:
            logits = self._forward(group, score=any(self.wants_prompt_scores(c) for c in group))  # (len(group), V)
            keep = [i for i, c in enumerate(group) if c.sample]  # prompt-only chunks and tails are not sampled
            if keep:
                rows.append(logits[keep] if len(keep) < len(group) else logits)
                to_sample.extend(group[i] for i in keep)
        if not to_sample:
            return verified
        raw = torch.cat(rows) if len(rows) > 1 else rows[0]  # (N, V)
        try:
            results = {rid: [r] for rid, r in self._sample(raw, to_sample).items()}
        except Exception:  # one bad row must not fail the batch: redo row by row, failing only the culprits
            log.exception("batched sampling failed; retrying row by row")
            results = {}
            for i, chunk in enumerate(to_sample):
                try:
                    results.update((rid, [r]) for rid, r in self._sample(raw[i : i + 1], [chunk]).items())
                except Exception as e:
                    results[chunk.request_id] = [SampleResult(-1, error=internal_error(f"sampling failed: {e}"))]
        results.update(verified)
        return results

    def _forward_rows(self, decodes: list[ChunkInput]) -> torch.Tensor:
        """One decode forward in which every token of every chunk is a row of its own (a draft's tokens at their
        positions, each seeing the keys before it: those of its sequence's cache and the draft tokens before it,
        written in this same forward). Returns the logits (N, V) of the N rows, chunk after chunk."""
        tables: list[list[int]] = []
        starts: list[int] = []
        ids: list[list[int]] = []
        loras: list[LoRAAdapter | None] = []
        for c in decodes:
            for j, t in enumerate(c.token_ids):
                tables.append(c.block_table)
                starts.append(c.start + j)
                ids.append([t])
                loras.append(c.lora)
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)  # (N, 1)
        step = self.cache.prepare(tables, starts, 1)
        return self.model(tokens, self.cache, step, Output.LAST, lora=LoRABatch.of(loras))  # (N, V)

    def _verify(self, raw: torch.Tensor, chunk: ChunkInput) -> dict[str, list[SampleResult]]:
        """raw: (k + 1, V) the logits after the chunk's last sampled token and after each of its k draft tokens.
        The kept tokens (model_core.speculative) with their logprobs; a failure ends this request only. A constrained
        request's rows get its grammar's mask at each draft position (`_draft_masks`: the draft is cut where the
        grammar refuses it)."""
        state, draft = chunk.sampling, chunk.draft
        params = state.params
        try:
            masked: torch.Tensor | None = None
            if state.matcher is not None:
                masked, draft = self._draft_masks(raw, draft, state.matcher)
                if masked is None:  # the grammar allows nothing here: the usual path says why
                    return {chunk.request_id: [self._sample(raw[:1], [chunk])[chunk.request_id]]}
                raw = raw[: len(draft) + 1]
            n = len(draft) + 1
            processed = process_logits(  # row j follows the output so far and the draft's first j tokens
                raw if masked is None else masked,
                [params] * n,
                [chunk.prompt_ids] * n,
                [chunk.output_ids + draft[:j] for j in range(n)],
                eos_token_ids=self.eos_token_ids,
            )
            if masked is not None:  # min_tokens can empty a row whose grammar allows only EOS: the grammar wins
                emptied = ~torch.isfinite(processed).any(dim=-1)  # (n,)
                processed[emptied] = masked[emptied]
            tokens = accept_draft(processed, draft, params, state.generator)
            if state.matcher is not None and not self._grammar_takes(state.matcher, tokens):
                if len(tokens) == 1:  # no draft token kept and the grammar refuses the one drawn: the usual path
                    return {chunk.request_id: [self._sample(raw[:1], [chunk])[chunk.request_id]]}
                tokens = tokens[:-1]  # the kept draft tokens alone
            kept = [SampleResult(t) for t in tokens]
            if params.logprobs is not None:
                m = len(tokens)
                targets = torch.tensor(tokens, dtype=torch.long, device=raw.device)  # (m,)
                for r, (lp, top) in zip(kept, compute_logprobs(raw[:m].float(), targets, [params.logprobs] * m)):
                    r.logprob, r.top_logprobs = lp, top
        except Exception as e:
            log.exception("verifying a draft failed")
            kept = [SampleResult(-1, error=internal_error(f"sampling failed: {e}"))]
        return {chunk.request_id: kept}

    def _sample(self, raw: torch.Tensor, chunks: list[ChunkInput]) -> dict[str, SampleResult]:
        """raw: (N, V) model logits for the N chunks to sample.

        Rows of constrained requests (state.matcher set) first get their grammar's token mask, then the
        usual processing: top-k/top-p/min-p and greedy argmax choose among the allowed tokens only.
        Logprobs stay those of the raw logits (OpenAI semantics)."""
        states = [c.sampling for c in chunks]
        params = [s.params for s in states]
        matchers = [s.matcher for s in states]
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        logits = raw
        dead: list[int] = []
        if constrained:
            logits = raw.to(torch.float32, copy=True)  # (N, V); raw stays unmasked for logprobs
            dead = apply_token_masks(logits, matchers)
        processed = process_logits(
            logits,
            params,
            [c.prompt_ids for c in chunks],
            [c.output_ids for c in chunks],
            eos_token_ids=self.eos_token_ids,
        )
        if constrained:
            # min_tokens masks EOS (and stop ids): where that leaves none of the tokens the grammar allows,
            # the grammar wins. Only those rows can have been emptied by the processing.
            held = [i for i in constrained if params[i].min_tokens > len(chunks[i].output_ids)]
            self._guard_constrained(logits, processed, held, dead)
        tokens = sample(processed, params, [s.generator for s in states])
        stuck: list[int] = []
        if constrained:
            stuck = self._resample_refused(tokens, processed, constrained, dead, matchers, params, states)
        results = {c.request_id: SampleResult(int(t)) for c, t in zip(chunks, tokens.tolist(), strict=True)}
        for i in dead:
            m = matchers[i]
            results[chunks[i].request_id] = SampleResult(
                -1,
                error=grammar_limit_error(m.error)
                if m is not None and m.error is not None
                else internal_error("constrained decoding failed: the grammar allows no token"),
            )
        for i in stuck:
            results[chunks[i].request_id] = SampleResult(
                -1,
                error=invalid_request(
                    "constrained decoding failed: the grammar engine cannot continue this output with the model's "
                    "tokens (the grammar's text splits characters the vocabulary encodes as byte tokens)"
                ),
            )
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lps = compute_logprobs(raw[want].float(), tokens[want], [params[i].logprobs or 0 for i in want])
            for i, (lp, top) in zip(want, lps, strict=True):
                r = results[chunks[i].request_id]
                r.logprob, r.top_logprobs = lp, top
        return results

    @staticmethod
    def _draft_masks(
        raw: torch.Tensor, draft: list[int], matcher: GrammarMatcher
    ) -> tuple[torch.Tensor | None, list[int]]:
        """The logits (n, V) float32 of a constrained request's verification rows with its grammar's mask at each
        (the matcher advanced through the draft, then rolled back), and the draft cut before its first token the
        grammar refuses or that leaves it nothing to allow. (None, []) when the grammar allows nothing at the
        first row."""
        V = raw.shape[-1]
        bitmask = allocate_bitmask(len(draft) + 1, V)  # (k + 1, W)
        matcher.fill_bitmask(bitmask, 0)
        advanced = 0
        for d in draft:
            if matcher.is_terminated or not matcher.validate(d) or not matcher.accept(d):
                break
            advanced += 1
            matcher.fill_bitmask(bitmask, advanced)
        if advanced:
            matcher.rollback(advanced)
        alive = (bitmask[: advanced + 1] != 0).any(dim=1).tolist()  # rows whose grammar allows some token
        rows = alive.index(False) if False in alive else advanced + 1
        if rows == 0:
            return None, []
        masked = raw[:rows].to(torch.float32, copy=True)  # (rows, V)
        masked.masked_fill_(unpack_bitmask(bitmask[:rows].to(raw.device), V).logical_not_(), float("-inf"))
        return masked, draft[: rows - 1]

    @staticmethod
    def _grammar_takes(matcher: GrammarMatcher, tokens: list[int]) -> bool:
        """Whether the grammar accepts the kept tokens in turn (a masked draw can still be refused: see
        `_resample_refused`); the matcher is left as it was."""
        ok = 0
        for t in tokens:
            if matcher.is_terminated or not matcher.validate(t) or not matcher.accept(t):
                break
            ok += 1
        if ok:
            matcher.rollback(ok)
        return ok == len(tokens)

    @staticmethod
    def _resample_refused(
        tokens: torch.Tensor,
        processed: torch.Tensor,
        rows: list[int],
        dead: list[int],
        matchers: list[GrammarMatcher | None],
        params: list[SamplingParams],
        states: list[SamplingState],
    ) -> list[int]:
        """A constrained row whose sampled token its matcher refuses although the mask allowed it gets that
        token banned and is sampled again (a few times), then the grammar's forced token is tried. Rows left
        with no token the parser accepts are returned (and added to `dead`): their grammar cannot be followed
        with this vocabulary (seen with choices that split multi-byte characters), an error, never a bad token."""
        stuck: list[int] = []
        for i in rows:
            m = matchers[i]
            if m is None or i in dead or m.validate(int(tokens[i])):
                continue
            for _ in range(MAX_RESAMPLES):
                processed[i, int(tokens[i])] = float("-inf")
                if not bool(torch.isfinite(processed[i]).any()):
                    break
                tokens[i] = sample(processed[i : i + 1], [params[i]], [states[i].generator])[0]
                if m.validate(int(tokens[i])):
                    break
            else:  # still refused: the token the grammar forces here (forced bytes the mask does not allow)
                forced = m.forced_tokens()
                if forced and m.validate(forced[0]):
                    tokens[i] = forced[0]
                    continue
            if not m.validate(int(tokens[i])):
                dead.append(i)
                stuck.append(i)
        return stuck

    @staticmethod
    def _guard_constrained(masked: torch.Tensor, processed: torch.Tensor, held: list[int], dead: list[int]) -> None:
        """Rows whose grammar allows no token (`dead`) get processed logits 0, so that sampling stays defined
        (their result is an error). A row of `held` the processing emptied although its grammar allows
        tokens gets its masked logits back."""
        for i in dead:
            processed[i] = 0.0
        if held:
            idx = torch.tensor(held, dtype=torch.long, device=masked.device)
            left = torch.isfinite(processed[idx]).any(dim=-1).tolist()  # (n,)
            for i, kept in zip(held, left, strict=True):
                if not kept and i not in dead:
                    processed[i] = masked[i]

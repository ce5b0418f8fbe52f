"""Draft-model proposals for speculative decoding: a small model with the target's vocabulary guesses the next k
tokens greedily, and the target verifies them in its step (model_core.speculative).

The draft model keeps its own paged KV cache and block pool, apart from the target's (its blocks are not the
scheduler's: a draft never takes the target's memory). Per request it remembers which tokens its cache holds; a
proposal first computes what the request gained since the last one (after verification: the kept tokens; the
cache's positions past the first token that differs were guesses and are overwritten), then k - 1 decode steps.
All requests asking in one engine step share each of those forwards. A request whose blocks do not fit the
pool gets no draft that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model_core.lm import CausalLM, Output
from model_core.sampling import greedy_ids
from service.engine.block_pool import BlockPool


@dataclass
class _DraftSeq:
    tokens: list[int] = field(default_factory=list)  # the tokens whose KV the draft's cache holds, from position 0
    blocks: list[int] = field(default_factory=list)


class DraftModelProposer:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.cache = model.new_cache(num_blocks, block_size)
        self.pool = BlockPool(num_blocks)
        self._seqs: dict[str, _DraftSeq] = {}

    def release(self, request_id: str) -> None:
        """Forget a request (it ended): its blocks go back to the pool."""
        st = self._seqs.pop(request_id, None)
        if st is not None and st.blocks:
            self.pool.free(reversed(st.blocks))

    @torch.inference_mode()
    def propose(self, wants: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
        """wants: (request id, its tokens so far (prompt and output), k >= 1). Returns up to k greedy tokens each."""
        rows: list[tuple[str, _DraftSeq, int, int]] = []  # (id, state, first position to compute, k)
        limit = self.model.cfg.max_seq_len
        for rid, tokens, k in wants:
            k = min(k, limit - len(tokens))
            if k <= 0:
                continue
            st = self._seqs.setdefault(rid, _DraftSeq())
            n = 0
            while n < min(len(st.tokens), len(tokens) - 1) and st.tokens[n] == tokens[n]:
                n += 1  # the cache holds these; the last token is computed again for its logits if need be
            st.tokens = list(tokens)
            need = -(-(len(tokens) + k - 1) // self.block_size) - len(st.blocks)
            if need > self.pool.num_free:
                self.release(rid)
                continue
            if need > 0:
                st.blocks.extend(self.pool.allocate(need))
            rows.append((rid, st, n, k))
        if not rows:
            return {}
        # 1. what each request gained since its last proposal, up to its last token: the first draft token
        counts = [len(st.tokens) - n for _, st, n, _ in rows]
        T = max(counts)
        ids = [st.tokens[n:] + [0] * (T - c) for (_, st, n, _), c in zip(rows, counts, strict=True)]
        x = torch.tensor(ids, dtype=torch.long, device=self.model.device)  # (B, T)
        step = self.cache.prepare([st.blocks for _, st, _, _ in rows], [n for _, _, n, _ in rows], counts)
        last = torch.tensor([c - 1 for c in counts], device=self.model.device)  # (B,)
        nxt = greedy_ids(self.model(x, self.cache, step, Output.at(last))).tolist()  # (B,)
        drafts = {rid: [int(t)] for (rid, _, _, _), t in zip(rows, nxt, strict=True)}
        # 2. k - 1 decode steps for the requests that want more
        for j in range(1, max(k for _, _, _, k in rows)):
            live = [(rid, st) for rid, st, _, k in rows if k > j]
            starts = [len(st.tokens) for _, st in live]
            ids = [[drafts[rid][-1]] for rid, _ in live]
            x = torch.tensor(ids, dtype=torch.long, device=self.model.device)  # (B, 1)
            step = self.cache.prepare([st.blocks for _, st in live], starts, 1)
            nxt = greedy_ids(self.model(x, self.cache, step, Output.LAST)).tolist()  # (B,)
            for (rid, st), t in zip(live, nxt, strict=True):
                st.tokens.append(drafts[rid][-1])  # its KV is in the cache now
                drafts[rid].append(int(t))
        return drafts

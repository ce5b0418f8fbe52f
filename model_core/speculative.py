"""Speculative decoding's acceptance rule: which tokens of a draft the model's own distributions keep.

A draft d_1..d_k proposed after a sequence's last token is scored in one forward: row j of the processed
logits (k + 1, V) is the model's next-token distribution p_j after the sequence and d_1..d_j. The tokens kept
are an accepted prefix of the draft and one token more, so every verification yields at least one token:

- greedy: d_(j+1) is kept while it is row j's argmax; the first that is not is replaced by that argmax; when all
  are kept, row k's argmax follows. The tokens are exactly those greedy decoding one at a time would make.
- sampling, for a draft proposed deterministically (n-gram lookup, a draft model's argmax: q = a point mass):
  d_(j+1) is kept with probability p_j(d_(j+1)); the first rejected one is replaced by a draw from p_j with
  d_(j+1) removed (renormalized); when all are kept, one more is drawn from p_k. This is the rejection rule of
  speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for a point-mass proposal: each kept token is
  distributed as the model's own next-token distribution, so the output's distribution is the model's.

The uniform draws come from the request's generator, one per draft token examined and one per token sampled.
"""

from __future__ import annotations

import torch

from model_core.sampling import SamplingParams, greedy_ids, sample


def accept_draft(
    processed: torch.Tensor, draft: list[int], params: SamplingParams, generator: torch.Generator | None
) -> list[int]:
    """processed: (k + 1, V) float32 logits after `process_logits`, row j following the draft's first j tokens.
    Returns the kept tokens: the accepted prefix of `draft` and the token after it (1 to k + 1 tokens)."""
    k = len(draft)
    if processed.shape[0] != k + 1:
        raise ValueError(f"{processed.shape[0]} rows of logits for a draft of {k} tokens (need {k + 1})")
    if params.greedy:
        best = greedy_ids(processed).tolist()  # (k + 1,)
        kept: list[int] = []
        for j, d in enumerate(draft):
            kept.append(int(best[j]))
            if best[j] != d:
                return kept
        return [*kept, int(best[k])]
    probs = torch.softmax(processed.float(), dim=-1)  # (k + 1, V)
    kept = []
    device = generator.device if generator is not None else processed.device
    for j, d in enumerate(draft):
        u = float(torch.rand((), dtype=torch.float64, generator=generator, device=device))
        p = float(probs[j, d])
        if u < p:
            kept.append(d)
            continue
        residual = processed[j : j + 1].clone()  # (1, V): p_j without d, renormalized by the draw
        residual[0, d] = float("-inf")
        if not bool(torch.isfinite(residual).any()):  # p_j(d) was all the mass (u < 1 = p missed by rounding)
            return [*kept, d]
        return [*kept, int(sample(residual, [params], [generator])[0])]
    return [*kept, int(sample(processed[k : k + 1], [params], [generator])[0])]

"""Reference scores of a causal LM computed the plain way: full forwards of the whole sequence, no KV cache, no
quantized kernels (dense fp32 weights), fp32 log_softmax. What served loglikelihoods and greedy generations are
checked against (benchmarks/lm_eval_check.py runs this as a subprocess).

    python -m model_core.tools.reference_lm [--model PATH.gguf] < requests.json > scores.json

requests.json: {"loglikelihood": [[context, continuation], ...],
                "greedy": [{"prompt": "...", "max_new_tokens": 16, "stop": ["\\n"]}, ...]}
scores.json:   {"loglikelihood": [float, ...], "greedy": ["generated text", ...]}

Tokenization is lm-evaluation-harness's for causal models (`TemplateLM._encode_pair`: trailing spaces of the
context move to the continuation; no special tokens added). A greedy generation stops at an end-of-sequence
token, after `max_new_tokens`, or once its text holds one of `stop` (the text is returned whole: the caller cuts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from model_core.default_model import find_default_model
from model_core.tokenizer import Tokenizer
from model_core.weights.loader import LoadedLM, load_lm


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for causal models (trailing spaces move to the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihood(lm: LoadedLM, context: str, continuation: str) -> float:
    """log P(continuation | context), one full forward of both."""
    ctx, cont = encode_pair(lm.tokenizer, context, continuation)
    lp = torch.log_softmax(lm.model(torch.tensor([ctx + cont]))[0].float(), dim=-1)  # (T, V)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@torch.no_grad()
def greedy(lm: LoadedLM, prompt: str, max_new_tokens: int = 16, stop: Sequence[str] = ()) -> str:
    """Greedy continuation of `prompt`, each token from a full forward of everything so far (no cache)."""
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    eos = set(lm.tokenizer.eos_token_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        t = int(lm.model(torch.tensor([ids + out]))[0, -1].argmax())
        if t in eos:
            break
        out.append(t)
        if any(s in lm.tokenizer.decode(out) for s in stop):
            break
    return lm.tokenizer.decode(out)


def score(lm: LoadedLM, requests: dict[str, Any]) -> dict[str, Any]:
    return {
        "loglikelihood": [loglikelihood(lm, c, x) for c, x in requests.get("loglikelihood", [])],
        "greedy": [
            greedy(lm, g["prompt"], int(g.get("max_new_tokens", 16)), tuple(g.get("stop", ())))
            for g in requests.get("greedy", [])
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model_core.tools.reference_lm", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory; default: the SmolLM2 GGUF")
    a = ap.parse_args(argv)
    requests = json.load(sys.stdin)
    lm = load_lm(a.model or find_default_model())
    json.dump(score(lm, requests), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

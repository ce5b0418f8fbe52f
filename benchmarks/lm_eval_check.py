"""lm-evaluation-harness against our server, checked against a direct computation with the reference model.

    python -m benchmarks.lm_eval_check [--base-url http://127.0.0.1:8000] [--limit N]

Starts the server on the default model (or uses `--base-url`), runs lm-eval's `local-completions` model with
`tokenizer_backend=remote` on the local tasks in benchmarks/lm_eval_tasks (aigc_tiny_mc: multiple choice by
loglikelihood, i.e. echo + logprobs; aigc_tiny_gen: generate_until), then scores the same items itself with
the reference model: the same GGUF file loaded with `load_lm` (fp32, dense weights) and a plain full forward
`model(tokens)` without cache, fp32 log_softmax; tokenization as lm-eval does it (`TemplateLM._encode_pair`).
Prints one JSON object: lm-eval's metrics, the reference's, and the largest |loglikelihood| difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import Launch, free_port, running, served_model_id

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
REPO = TASKS_DIR.parent.parent
MC_TASK, GEN_TASK = "aigc_tiny_mc", "aigc_tiny_gen"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="a running server (default: start one on the default model)")
    p.add_argument("--model", help="GGUF file of the reference (default: the default model)")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--tasks", default=f"{MC_TASK},{GEN_TASK}")
    p.add_argument("--num-concurrent", type=int, default=4)
    return p.parse_args(argv)


def run_lm_eval(base_url: str, tasks: list[str], limit: int | None, num_concurrent: int) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = served_model_id(base_url, "default")
    args = (
        f"model={model},base_url={base_url}/v1/completions,tokenizer_backend=remote,"
        f"num_concurrent={num_concurrent},max_retries=1"
    )
    cwd = os.getcwd()
    os.chdir(REPO)  # the task files name their data relative to the repository root
    try:
        out: dict[str, Any] = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=tasks,
            limit=limit,
            log_samples=True,
            task_manager=TaskManager(include_path=str(TASKS_DIR)),
        )
    finally:
        os.chdir(cwd)
    return out


def _docs(name: str, limit: int | None) -> list[dict[str, Any]]:
    with open(TASKS_DIR / f"{name}.jsonl") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return docs[:limit] if limit is not None else docs


def _encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for causal models (trailing spaces move to the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def reference_mc(lm: Any, limit: int | None) -> tuple[dict[str, float], list[list[float]]]:
    """acc / acc_norm of the reference model on the multiple-choice task, and every choice's loglikelihood."""
    docs = _docs(MC_TASK, limit)
    hits = norm_hits = 0
    lls_all: list[list[float]] = []
    for d in docs:
        context = f"Question: {d['question']}\nAnswer:"
        lls = []
        for choice in d["choices"]:
            ctx, cont = _encode_pair(lm.tokenizer, context, " " + choice)
            ids = ctx + cont
            lp = torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
            lls.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        lls_all.append(lls)
        hits += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
        normed = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
        norm_hits += int(max(range(len(normed)), key=normed.__getitem__) == d["answer"])
    return {"acc": hits / len(docs), "acc_norm": norm_hits / len(docs)}, lls_all


@torch.no_grad()
def reference_gen(lm: Any, limit: int | None, max_new: int = 16) -> tuple[float, list[str]]:
    """exact_match of greedy generation with full forwards (no cache) until a newline, as the task scores it."""
    import re
    import string

    docs = _docs(GEN_TASK, limit)
    prefix = (
        "Answer each question in a few words.\n\nQuestion: What color is grass?\nAnswer: Green\n\n"
        "Question: What is the capital of England?\nAnswer: London\n\n"
    )
    eos = set(lm.tokenizer.eos_token_ids)
    texts, hits = [], 0
    for d in docs:
        ids = lm.tokenizer.encode(prefix + f"Question: {d['question']}\nAnswer:", add_special_tokens=False)
        out: list[int] = []
        for _ in range(max_new):
            t = int(lm.model(torch.tensor([ids + out]))[0, -1].argmax())
            if t in eos:
                break
            out.append(t)
            if "\n" in lm.tokenizer.decode(out) or "Question:" in lm.tokenizer.decode(out):
                break
        text = re.split(r"\n|Question:", lm.tokenizer.decode(out))[0].lstrip()
        texts.append(text)

        def norm(s: str) -> str:
            return s.lower().translate(str.maketrans("", "", string.punctuation))

        hits += int(norm(text) == norm(d["answer"]))
    return hits / len(docs), texts


def compare(results: dict[str, Any], model_path: str | None, limit: int | None) -> dict[str, Any]:
    from model_core.tokenizer import find_default_model
    from model_core.weights.loader import load_lm

    lm = load_lm(model_path or find_default_model())
    summary: dict[str, Any] = {
        "lm_eval": {
            k: {m: v for m, v in r.items() if "stderr" not in m and m != "alias"} for k, r in results["results"].items()
        }
    }
    samples = results.get("samples", {})
    if MC_TASK in samples:
        ref, ref_lls = reference_mc(lm, limit)
        diffs = []
        for s in samples[MC_TASK]:
            served = [float(r[0][0]) for r in s["resps"]]
            diffs += [abs(a - b) for a, b in zip(served, ref_lls[s["doc_id"]], strict=True)]
        summary["reference"] = {MC_TASK: ref}
        summary["max_abs_loglikelihood_diff"] = max(diffs)
    if GEN_TASK in samples:
        em, texts = reference_gen(lm, limit)
        served_texts = {s["doc_id"]: s["filtered_resps"][0] for s in samples[GEN_TASK]}
        summary.setdefault("reference", {})[GEN_TASK] = {"exact_match": em}
        summary["generations_equal_to_reference"] = sum(served_texts.get(i) == t for i, t in enumerate(texts))
        summary["generations"] = len(texts)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    tasks = a.tasks.split(",")
    if a.base_url:
        results = run_lm_eval(a.base_url.rstrip("/"), tasks, a.limit, a.num_concurrent)
    else:
        port = free_port()
        launch = Launch(
            "ours",
            (
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--enable-gan",
                "false",
                "--log-level",
                "warning",
            ),
            (),
            port,
            "/ready",
        )
        with tempfile.TemporaryDirectory() as logs, running(launch, logs, 300.0):
            results = run_lm_eval(launch.base_url, tasks, a.limit, a.num_concurrent)
    summary = compare(results, a.model, a.limit)
    print(json.dumps(summary, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()

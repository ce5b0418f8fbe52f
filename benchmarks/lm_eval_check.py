"""lm-evaluation-harness against our server, checked against a direct computation with the reference model.

    python -m benchmarks.lm_eval_check [--base-url http://127.0.0.1:8000] [--limit N]

Starts the server on the default model (or uses `--base-url`), runs lm-eval's `local-completions` model with
`tokenizer_backend=remote` on the local tasks in benchmarks/lm_eval_tasks (aigc_tiny_mc: multiple choice by
loglikelihood, i.e. echo + logprobs; aigc_tiny_gen: generate_until), then has the same items scored by the
reference model: `python -m model_core.tools.reference_lm` in a subprocess (the same GGUF file, fp32 dense
weights, plain full forwards without cache, fp32 log_softmax; tokenization as lm-eval does it). This module
is a client: it reaches the model only through the server and that subprocess.
Prints one JSON object: lm-eval's metrics, the reference's, and the largest |loglikelihood| difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.run import ours_launch, running, served_model_id

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
REPO = TASKS_DIR.parent.parent
MC_TASK, GEN_TASK = "aigc_tiny_mc", "aigc_tiny_gen"
# The reference scorer: an in-process computation with the model's own code, run as a subprocess.
REFERENCE_CMD = ("-m", "model_core.tools.reference_lm")
GEN_PREFIX = (
    "Answer each question in a few words.\n\nQuestion: What color is grass?\nAnswer: Green\n\n"
    "Question: What is the capital of England?\nAnswer: London\n\n"
)
GEN_STOP = ("\n", "Question:")


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


def reference_scores(requests: dict[str, Any], model_path: str | None) -> dict[str, Any]:
    """Run the reference scorer on `requests` (see model_core/tools/reference_lm.py) and return its answer."""
    cmd = [sys.executable, *REFERENCE_CMD, *(["--model", model_path] if model_path else [])]
    out = subprocess.run(cmd, input=json.dumps(requests), capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"reference scorer failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def _norm(s: str) -> str:
    return s.lower().translate(str.maketrans("", "", string.punctuation))


def compare(results: dict[str, Any], model_path: str | None, limit: int | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "lm_eval": {
            k: {m: v for m, v in r.items() if "stderr" not in m and m != "alias"} for k, r in results["results"].items()
        }
    }
    samples = results.get("samples", {})
    mc_docs = _docs(MC_TASK, limit) if MC_TASK in samples else []
    gen_docs = _docs(GEN_TASK, limit) if GEN_TASK in samples else []
    pairs = [(f"Question: {d['question']}\nAnswer:", " " + c) for d in mc_docs for c in d["choices"]]
    prompts = [GEN_PREFIX + f"Question: {d['question']}\nAnswer:" for d in gen_docs]
    ref = reference_scores(
        {
            "loglikelihood": pairs,
            "greedy": [{"prompt": p, "max_new_tokens": 16, "stop": list(GEN_STOP)} for p in prompts],
        },
        model_path,
    )
    if mc_docs:
        flat: list[float] = ref["loglikelihood"]
        ref_lls, i = [], 0
        hits = norm_hits = 0
        for d in mc_docs:
            lls = flat[i : i + len(d["choices"])]
            i += len(d["choices"])
            ref_lls.append(lls)
            hits += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
            normed = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
            norm_hits += int(max(range(len(normed)), key=normed.__getitem__) == d["answer"])
        diffs = []
        for s in samples[MC_TASK]:
            served = [float(r[0][0]) for r in s["resps"]]
            diffs += [abs(a - b) for a, b in zip(served, ref_lls[s["doc_id"]], strict=True)]
        summary["reference"] = {MC_TASK: {"acc": hits / len(mc_docs), "acc_norm": norm_hits / len(mc_docs)}}
        summary["max_abs_loglikelihood_diff"] = max(diffs)
    if gen_docs:
        # cut as the task scores it: up to a newline or the next "Question:"
        texts = [re.split(r"\n|Question:", t)[0].lstrip() for t in ref["greedy"]]
        em = sum(_norm(t) == _norm(d["answer"]) for t, d in zip(texts, gen_docs, strict=True)) / len(gen_docs)
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
        launch = ours_launch("ours", None, None, "--no-enable-gan")
        with tempfile.TemporaryDirectory() as logs, running(launch, logs, 300.0):
            results = run_lm_eval(launch.base_url, tasks, a.limit, a.num_concurrent)
    summary = compare(results, a.model, a.limit)
    print(json.dumps(summary, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()

"""Accuracy of what the server runs on a GGUF file against Hugging Face transformers in fp32 on the same file.

For each file: HF transformers loads it in float32 (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`,
which dequantizes every tensor with gguf-py) and scores a text in one full forward: the reference. Ours is the model
as the server loads it with its defaults (`load_for_inference`: the backend `--kernels` picks, the dtype `--dtype`
picks for it, the kernels' default rows on the quantized weights, batch-invariant unless --no-batch-invariant),
scoring the same token ids the way the server's decode steps do: one token per forward through the paged KV cache (as
tests/model_core/test_smollm2.py's decode-path test does). Reported per file, as a markdown table row: the file's
tensor types, our backend and dtype, max |logit diff| and top-1 agreement over every position, the mean |log-prob
diff| of the text's tokens, and perplexity ours vs HF.

    python -m model_core.tools.quant_accuracy FILE.gguf [FILE2.gguf ...] [--text-file PATH] [--tokens N]
                                              [--kernels auto] [--dtype auto] [--hf-bf16] [--no-batch-invariant]
                                              [--json OUT.json]

The text is a fixed public-domain passage (the Gettysburg Address, 320 tokens with SmolLM2's tokenizer)
unless --text-file is given. Needs `transformers` (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model_core.lm import Output
from model_core.qmatmul import QuantLinear
from model_core.weights.gguf_reader import open_gguf
from model_core.weights.loader import LoadedLM, load_for_inference

# Lincoln's Gettysburg Address (1863, the Bliss copy; public domain), chosen as a well-known English text, not tuned.
PASSAGE = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so "
    "dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion "
    "of that field, as a final resting place for those who here gave their lives that that nation might live. It is "
    "altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The "
    "brave men, living and dead, who struggled here, have consecrated it, far above our poor power to add or "
    "detract. The world will little note, nor long remember what we say here, but it can never forget what they did "
    "here. It is for us the living, rather, to be dedicated here to the unfinished work which they who fought here "
    "have thus far so nobly advanced. It is rather for us to be here dedicated to the great task remaining before "
    "us -- that from these honored dead we take increased devotion to that cause for which they gave the last full "
    "measure of devotion -- that we here highly resolve that these dead shall not have died in vain -- that this "
    "nation, under God, shall have a new birth of freedom -- and that government of the people, by the people, for "
    "the people, shall not perish from the earth.\n"
)


def table_header(hf_bf16: bool = False) -> str:
    """The markdown table's header (hf_bf16: with the column of HF bf16's own deviation from HF fp32)."""
    extra = ("| HF bf16 mean abs d logprob ", "---:|") if hf_bf16 else ("", "")
    return (
        "| file | tensor types | backend | dtype | tokens | max abs logit diff | top-1 agreement | mean abs d logprob "
        f"| perplexity ours | perplexity HF fp32 | ppl delta {extra[0]}| seconds |\n"
        f"|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|{extra[1]}---:|"
    )


TABLE_HEADER = table_header()


@dataclass(frozen=True)
class Accuracy:
    """One file's figures: ours (the server's decode path) against HF transformers fp32 on the same GGUF."""

    file: str
    tensor_types: str  # every tensor of the file, e.g. "Q5_0 x151, F32 x61, Q6_K x30, Q8_0 x30"
    backend: str  # e.g. "native-avx512bf16 (exact products)"
    dtype: str
    quantized_layers: int  # linear layers that run on the file's weights as stored (QuantLinear)
    tokens: int  # positions scored (logits at each); log-probs cover tokens - 1 of them
    max_logit_diff: float
    top1_agree: int
    mean_logprob_diff: float
    ppl_ours: float
    ppl_hf: float
    seconds: float
    # HF transformers run in bf16 on the same file, mean |log p - log p HF fp32|: what rounding to bf16 alone costs
    # (tests/model_core/test_smollm2.py bounds the serving paths by twice it); None unless asked for
    hf_bf16_logprob_diff: float | None = None

    @property
    def top1_fraction(self) -> float:
        return self.top1_agree / self.tokens

    @property
    def ppl_delta(self) -> float:
        """(ours - HF) / HF."""
        return (self.ppl_ours - self.ppl_hf) / self.ppl_hf


def tensor_types(path: str | os.PathLike[str]) -> str:
    """The file's tensor types with their counts, most common first."""
    kinds = Counter(getattr(t.tensor_type, "name", str(t.tensor_type)) for t in open_gguf(path).tensors)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def decode_logits(lm: LoadedLM, ids: Sequence[int]) -> torch.Tensor:
    """Logits after each token as the server computes them while decoding: one token per forward through the paged
    cache (blocks of 16), with the backend's kernels. (T, V) float32."""
    blocks = (len(ids) + 15) // 16
    cache = lm.model.new_cache(blocks, 16)
    out = []
    with torch.inference_mode():
        for t, tok in enumerate(ids):
            step = cache.prepare([list(range(blocks))], [t], 1)
            out.append(lm.model(torch.tensor([[tok]]), cache, step, Output.LAST)[0].float())
    return torch.stack(out)


def target_logprobs(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """log p(token t+1 | tokens 0..t) for each t: (T-1,) float32 of logits (T, V)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(list(ids[1:])).unsqueeze(1)).squeeze(1)


def hf_logits(path: str | os.PathLike[str], ids: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF transformers in `dtype` on the same GGUF (it dequantizes every tensor): one full forward of `ids`. (T, V)
    float32."""
    import transformers

    d, name = os.path.split(os.path.abspath(path))
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
    model.eval()
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)])).logits[0].float()
    del model
    return logits


def text_ids(lm: LoadedLM, text: str, tokens: int | None) -> list[int]:
    """`text` in the file's tokenizer (special tokens as the server adds them to a prompt), cut to `tokens` and to the
    model's context."""
    ids = lm.tokenizer.encode(text)
    cap = min(tokens or len(ids), lm.config.max_seq_len)
    return list(ids[:cap])


def measure(
    path: str | os.PathLike[str],
    text: str = PASSAGE,
    *,
    tokens: int | None = None,
    kernels: str = "auto",
    dtype: str = "auto",
    hf_bf16: bool = False,
    batch_invariant: bool | None = None,
) -> Accuracy:
    """Ours as the server loads `path` (backend `kernels`, dtype `dtype` as its flags pick them, batch_invariant as
    its --batch-invariant) against HF fp32; hf_bf16: also HF in bf16 against HF fp32 (another load of the file)."""
    t0 = time.perf_counter()
    lm = load_for_inference(path, "cpu", dtype, kernels, batch_invariant=batch_invariant)
    ids = text_ids(lm, text, tokens)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); need at least 2 to score")
    mine = decode_logits(lm, ids)
    ref = hf_logits(path, ids)
    if mine.shape != ref.shape:
        raise ValueError(f"logits of shape {tuple(mine.shape)} (ours) vs {tuple(ref.shape)} (HF)")
    lp, lp_ref = target_logprobs(mine, ids), target_logprobs(ref, ids)
    noise = None
    if hf_bf16:
        noise = float((target_logprobs(hf_logits(path, ids, torch.bfloat16), ids) - lp_ref).abs().mean())
    mode = (f" ({lm.products})" if lm.products else "") + (", batch-invariant" if lm.model.batch_invariant else "")
    return Accuracy(
        file=os.path.basename(path),
        tensor_types=tensor_types(path),
        backend=lm.backend.name + mode,
        dtype=str(lm.model.dtype).removeprefix("torch."),
        quantized_layers=sum(isinstance(m, QuantLinear) for m in lm.model.modules()),
        tokens=len(ids),
        max_logit_diff=float((mine - ref).abs().max()),
        top1_agree=int((mine.argmax(-1) == ref.argmax(-1)).sum()),
        mean_logprob_diff=float((lp - lp_ref).abs().mean()),
        ppl_ours=float(torch.exp(-lp.mean())),
        ppl_hf=float(torch.exp(-lp_ref.mean())),
        seconds=time.perf_counter() - t0,
        hf_bf16_logprob_diff=noise,
    )


def table_row(a: Accuracy) -> str:
    """One markdown row under table_header(a.hf_bf16_logprob_diff is not None)."""
    noise = "" if a.hf_bf16_logprob_diff is None else f" {a.hf_bf16_logprob_diff:.4f} |"
    return (
        f"| {a.file} | {a.tensor_types} | {a.backend} | {a.dtype} | {a.tokens} | {a.max_logit_diff:.3f} | "
        f"{a.top1_agree}/{a.tokens} = {a.top1_fraction:.1%} | {a.mean_logprob_diff:.4f} | {a.ppl_ours:.3f} | "
        f"{a.ppl_hf:.3f} | {a.ppl_delta:+.2%} |{noise} {a.seconds:.0f} |"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model_core.tools.quant_accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="GGUF files")
    ap.add_argument("--text-file", default=None, help="score this UTF-8 text instead of the built-in passage")
    ap.add_argument("--tokens", type=int, default=None, help="score only the text's first N tokens")
    ap.add_argument("--kernels", default="auto", help="decode backend, as the server's --kernels (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16, as the server's --dtype")
    ap.add_argument(
        "--hf-bf16",
        action="store_true",
        help="also score HF transformers in bf16 against its fp32: the deviation rounding to bf16 alone causes",
    )
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None, help="as the server's")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("-v", "--verbose", action="store_true", help="the loader's log lines")
    a = ap.parse_args(argv)
    if a.tokens is not None and a.tokens < 2:
        ap.error("--tokens must be at least 2")
    return a


def main(argv: Sequence[str] | None = None) -> list[Accuracy]:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    text = Path(a.text_file).read_text(encoding="utf-8") if a.text_file else PASSAGE
    args = sys.argv[1:] if argv is None else list(argv)
    print(f"command: python -m model_core.tools.quant_accuracy {shlex.join(args)}")
    print(f"threads: {torch.get_num_threads()}; text: {a.text_file or 'built-in passage (Gettysburg Address)'}\n")
    print(table_header(a.hf_bf16), flush=True)
    results: list[Accuracy] = []
    for f in a.files:
        acc = measure(
            f, text, tokens=a.tokens, kernels=a.kernels, dtype=a.dtype, hf_bf16=a.hf_bf16,
            batch_invariant=a.batch_invariant,
        )  # fmt: skip
        results.append(acc)
        print(table_row(acc), flush=True)
    if a.json:
        out: list[dict[str, Any]] = [
            {**asdict(r), "top1_fraction": r.top1_fraction, "ppl_delta": r.ppl_delta} for r in results
        ]
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

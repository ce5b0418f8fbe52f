"""A DCGAN-style class-conditional GAN: config, Generator, Discriminator, sampler and loader.

Generator: [z ; embed(y)] -> 4x4 transposed conv -> (ConvT stride 2, BN, ReLU)* -> Tanh.
Discriminator: (strided conv, BN, LeakyReLU)* -> global sum -> linear + projection onto embed(y)
(Miyato & Koyama 2018). Weights are initialised as in the DCGAN paper (Radford et al. 2015).
The sampler draws one latent per seed (row i of a request comes from seed + i), truncates by
resampling entries with |z| > psi, and interpolates between two seeds' latents with slerp.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model_core.checkpoint import config_fields, read_config, read_tensors, write_checkpoint

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class GANConfig:
    z_dim: int = 64
    num_classes: int = 10
    embed_dim: int = 16  # class embedding concatenated to z in the generator
    g_width: int = 16  # generator channels at the last hidden stage; doubles per stage towards 4x4
    d_width: int = 16  # discriminator channels after the first conv; doubles per stage
    image_size: int = 32  # square, a power of two >= 8
    image_channels: int = 1
    class_names: tuple[str, ...] = DIGIT_NAMES

    def __post_init__(self) -> None:
        for name in ("z_dim", "num_classes", "embed_dim", "g_width", "d_width", "image_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GANConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        s = self.image_size
        if not isinstance(s, int) or s < 8 or s & (s - 1):
            raise ValueError(f"GANConfig.image_size must be a power of two >= 8, got {s!r}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"GANConfig.class_names has {len(self.class_names)} names for {self.num_classes} classes")

    @property
    def n_stages(self) -> int:
        """Number of stride-2 stages between 4x4 and image_size."""
        return int(math.log2(self.image_size)) - 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GANConfig:
        kwargs = config_fields(cls, d, "GAN")
        if "class_names" in kwargs:
            kwargs["class_names"] = tuple(kwargs["class_names"])
        return cls(**kwargs)


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN init: conv/linear/embedding weights ~ N(0, 0.02), BN gamma ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            bias = getattr(m, "bias", None)
            if isinstance(bias, Tensor):
                nn.init.zeros_(bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        c = config.g_width * 2 ** (config.n_stages - 1)  # channels at 4x4
        self.embed = nn.Embedding(config.num_classes, config.embed_dim)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.z_dim + config.embed_dim, c, 4, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        ]
        for _ in range(config.n_stages - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, config.image_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)
        nn.init.normal_(self.embed.weight, 0.0, 1.0)  # on the scale of z, or G starts class-blind

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z (B, z_dim), labels (B,) int64 -> images (B, C, S, S) in [-1, 1]."""
        h = torch.cat([z, self.embed(labels)], dim=1)  # (B, z_dim + embed_dim)
        return self.net(h[:, :, None, None])  # (B, z+e, 1, 1) -> (B, C, S, S)


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_width
        layers: list[nn.Module] = [
            nn.Conv2d(config.image_channels, c, 4, 2, 1),  # no BatchNorm on the input layer (DCGAN)
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(config.n_stages - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        self.net = nn.Sequential(*layers)
        self.linear = nn.Linear(c, 1)
        self.embed = nn.Embedding(config.num_classes, c)  # projection conditioning
        dcgan_init_(self)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """x (B, C, S, S), labels (B,) -> logits (B,) of "real"."""
        h = self.net(x).sum(dim=(2, 3))  # (B, c, 4, 4) -> (B, c)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


# ---- sampler -----------------------------------------------------------------------------------


def latent_from_seed(seed: int, z_dim: int, truncation: float | None = None) -> Tensor:
    """One latent (z_dim,) ~ N(0, I) from `seed`; with `truncation` psi, entries with |z| > psi
    are redrawn (from the same stream) until all lie within [-psi, psi]."""
    if truncation is not None and not truncation > 0:
        raise ValueError(f"truncation must be > 0, got {truncation}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(z_dim, generator=g)
    if truncation is not None:
        bad = z.abs() > truncation
        while bool(bad.any()):
            z[bad] = torch.randn(int(bad.sum()), generator=g)
            bad = z.abs() > truncation
    return z


def sample_latents(seeds: list[int], z_dim: int, truncation: float | None = None) -> Tensor:
    """Latents (len(seeds), z_dim): row i depends only on seeds[i] and truncation."""
    return torch.stack([latent_from_seed(s, z_dim, truncation) for s in seeds])


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between (D,) latents at fractions t (T,) -> (T, D)."""
    u0, u1 = z0 / z0.norm(), z1 / z1.norm()
    omega = torch.arccos((u0 * u1).sum().clamp(-1.0, 1.0))
    t = t[:, None]  # (T, 1)
    if float(omega) < 1e-6:  # (anti)parallel within tolerance: fall back to linear
        return (1 - t) * z0 + t * z1
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * z0 + (torch.sin(t * omega) / so) * z1  # (T, D)


def interpolate_latents(seed_a: int, seed_b: int, steps: int, z_dim: int, truncation: float | None = None) -> Tensor:
    """`steps` >= 2 frames (steps, z_dim) from seed_a's latent to seed_b's, endpoints included."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    z0 = latent_from_seed(seed_a, z_dim, truncation)
    z1 = latent_from_seed(seed_b, z_dim, truncation)
    return slerp(z0, z1, torch.linspace(0.0, 1.0, steps))


def label_from_prompt(prompt: str, class_names: tuple[str, ...] = DIGIT_NAMES) -> int | None:
    """'7', ' Seven ' -> 7; anything that names no class -> None."""
    p = prompt.strip().lower()
    for i, name in enumerate(class_names):
        if p == str(i) or p == name.lower():
            return i
    return None


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, 1, S, S) -> uint8 (B, S, S), rounding to nearest."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8)[:, 0]  # (B, S, S)


@torch.no_grad()
def generate(generator: Generator, labels: list[int], seeds: list[int], truncation: float | None = None) -> Tensor:
    """Reference single-request sampling: images (B, C, S, S) in [-1, 1] on the CPU."""
    device = next(generator.parameters()).device
    z = sample_latents(seeds, generator.config.z_dim, truncation).to(device)
    y = torch.tensor(labels, dtype=torch.long, device=device)
    return generator.eval()(z, y).float().cpu()


# ---- checkpoint --------------------------------------------------------------------------------


def default_gan_path() -> Path:
    """The checkpoint shipped with the package."""
    return Path(__file__).parent / "assets" / "gan"


def save_gan(generator: Generator, path_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `config.json` (+ `extra` under "training") and `model.safetensors` (generator only)."""
    return write_checkpoint(
        path_dir, generator.config.to_dict(), generator.state_dict(), model="gan-generator", extra=extra
    )


def load_gan(path_dir: str | Path | None = None, device: str | torch.device = "cpu") -> Generator:
    """Load a generator checkpoint directory, validating the config and every tensor's name, shape and values."""
    d = Path(path_dir) if path_dir is not None else default_gan_path()
    model = Generator(read_config(d, "GAN", GANConfig.from_dict))
    model.load_state_dict(read_tensors(d, model.state_dict()))
    return model.to(device).eval()

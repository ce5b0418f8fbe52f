"""GAN micro-batcher: concurrent image requests share one generator forward pass.

A collector task on the event loop (`service.engine.micro_batcher.MicroBatcher`) takes the first
queued request, then keeps taking requests until the batch holds `max_batch` images or `max_wait_ms`
has passed since the first one; the forward runs on a single worker thread, and the output is split
back per request. A request of more than `max_batch` images is run alone, in chunks of `max_batch`.

Every forward is padded to exactly `max_batch` rows (when `pad_to_max_batch`): the kernels then
see one fixed shape, so a request's images are bit-identical whatever it was batched with (on
the CPU, convolutions at different batch sizes can differ in the last bit of float32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model_core.gan import Generator
from service.engine.micro_batcher import BatcherNotRunning, MicroBatcher

__all__ = ["BatcherNotRunning", "ImageBatcher", "ImageRequest"]

log = logging.getLogger("service.engine.images")


@dataclass(frozen=True)
class ImageRequest:
    """`latents` (n, z_dim) and `labels` (n,) int64; row i of each makes image i."""

    latents: Tensor
    labels: Tensor

    @property
    def n(self) -> int:
        return int(self.latents.shape[0])


class ImageBatcher(MicroBatcher[ImageRequest, Tensor]):
    """Micro-batches `generate()` calls into forward passes of at most `max_batch` images."""

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        *,
        pad_to_max_batch: bool = True,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        super().__init__(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            on_batch=on_batch,  # called (images, requests, seconds) after every batch
            name="gan-batcher",
            label="image batcher",
            thread_name_prefix="gan-forward",
            logger=log,
        )
        self.generator = generator.eval()
        self.config = generator.config
        self.pad_to_max_batch = pad_to_max_batch
        param = next(generator.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.forward_passes = 0
        self.images_generated = 0

    # ---- requests ------------------------------------------------------------------------------

    def _validate(self, req: ImageRequest) -> None:
        z, y, cfg = req.latents, req.labels, self.config
        if z.ndim != 2 or z.shape[1] != cfg.z_dim or z.shape[0] < 1:
            raise ValueError(f"latents must be (n >= 1, {cfg.z_dim}), got {tuple(z.shape)}")
        if y.shape != (z.shape[0],) or y.dtype != torch.long:
            raise ValueError(f"labels must be int64 of shape ({z.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= cfg.num_classes:
            raise ValueError(f"labels must lie in [0, {cfg.num_classes})")

    async def generate(self, request: ImageRequest) -> Tensor:
        """Images (n, C, S, S) float32 in [-1, 1] on the CPU, in the request's row order."""
        self._validate(request)
        return await self.submit(request)

    def request_rows(self, request: ImageRequest) -> int:
        return request.n

    # ---- worker thread -------------------------------------------------------------------------

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[ImageRequest]) -> list[Tensor]:
        """Chunks of max_batch, each padded to max_batch rows; the output split back per request."""
        z = torch.cat([r.latents for r in requests])  # (N, z_dim)
        y = torch.cat([r.labels for r in requests])  # (N,)
        outs = []
        for s in range(0, z.shape[0], self.max_batch):
            zc, yc = z[s : s + self.max_batch], y[s : s + self.max_batch]  # (b, z_dim), (b,)
            b = zc.shape[0]
            if self.pad_to_max_batch and b < self.max_batch:
                zc = torch.cat([zc, zc.new_zeros(self.max_batch - b, zc.shape[1])])  # (max_batch, z_dim)
                yc = torch.cat([yc, yc.new_zeros(self.max_batch - b)])  # (max_batch,)
            out = self.generator(zc.to(self.device, self.dtype), yc.to(self.device))  # (B, C, S, S)
            outs.append(out[:b].float().cpu())
            self.forward_passes += 1
        self.images_generated += int(z.shape[0])
        images = torch.cat(outs)  # (N, C, S, S)
        return list(images.split([r.n for r in requests]))  # (n, C, S, S) per request

"""The GAN micro-batcher: merging, splitting, bit-equality with serving alone, lifecycle."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from model_core.gan import GANConfig, Generator, sample_latents
from service.engine.images import BatcherNotRunning, ImageBatcher, ImageRequest

CFG = GANConfig(g_width=8, d_width=8)


def make_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(CFG)
    for m in g.modules():  # non-trivial eval-mode statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return g.eval()


class CountingGenerator(Generator):
    """Counts forward passes and records the thread each one ran on, independently of the batcher."""

    def __init__(self, base: Generator) -> None:
        super().__init__(base.config)
        self.load_state_dict(base.state_dict())
        self.eval()
        self.calls: list[int] = []
        self.threads: list[str] = []

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(z.shape[0]))
        self.threads.append(threading.current_thread().name)
        return super().forward(z, labels)


def request(seed: int, n: int, label: int) -> ImageRequest:
    z = sample_latents([seed + i for i in range(n)], CFG.z_dim)
    return ImageRequest(z, torch.full((n,), label, dtype=torch.long))


async def serve_alone(gen: Generator, reqs: list[ImageRequest], max_batch: int) -> list[torch.Tensor]:
    b = ImageBatcher(gen, max_batch=max_batch, max_wait_ms=0)
    await b.start()
    try:
        return [await b.generate(r) for r in reqs]
    finally:
        await b.stop()


def test_32_concurrent_requests_merge_and_match_served_alone() -> None:
    gen = CountingGenerator(make_generator())
    reqs = [request(1000 + 37 * i, n=1 + i % 3, label=i % 10) for i in range(32)]

    async def main() -> tuple[list[torch.Tensor], ImageBatcher]:
        b = ImageBatcher(gen, max_batch=32, max_wait_ms=50)
        await b.start()
        try:
            outs = await asyncio.gather(*(b.generate(r) for r in reqs))
        finally:
            await b.stop()
        return list(outs), b

    outs, b = asyncio.run(main())
    total = sum(r.n for r in reqs)  # 63 images
    assert len(gen.calls) == b.forward_passes
    assert b.forward_passes < len(reqs)
    assert b.forward_passes >= -(-total // 32)  # at least ceil(63 / 32)
    assert all(c == 32 for c in gen.calls)  # every pass padded to max_batch
    assert b.images_generated == total and b.requests_served == len(reqs)
    assert set(gen.threads) != {threading.main_thread().name}
    assert all(t.startswith("gan-forward") for t in gen.threads)  # off the event loop

    alone = asyncio.run(serve_alone(gen, reqs, max_batch=32))
    with torch.inference_mode():
        for r, o, a in zip(reqs, outs, alone):
            assert o.shape == (r.n, 1, 32, 32)
            assert torch.equal(o, a)  # bit-identical to the request served on its own
            ref = gen(r.latents, r.labels)  # unpadded forward: equal up to float rounding
            torch.testing.assert_close(o, ref, atol=1e-5, rtol=0)


def test_request_larger_than_max_batch_is_chunked_in_order() -> None:
    gen = CountingGenerator(make_generator(1))
    r = request(7, n=10, label=3)
    (out,) = asyncio.run(serve_alone(gen, [r], max_batch=4))
    assert gen.calls == [4, 4, 4]  # ceil(10 / 4) passes, each padded to 4
    with torch.inference_mode():
        torch.testing.assert_close(out, gen(r.latents, r.labels), atol=1e-5, rtol=0)


def test_requests_that_do_not_fit_go_to_the_next_batch() -> None:
    gen = CountingGenerator(make_generator(2))
    reqs = [request(10 * i, n=3, label=i) for i in range(4)]  # 12 images, max_batch 8

    async def main() -> list[torch.Tensor]:
        b = ImageBatcher(gen, max_batch=8, max_wait_ms=50)
        await b.start()
        try:
            return list(await asyncio.gather(*(b.generate(r) for r in reqs)))
        finally:
            await b.stop()

    outs = asyncio.run(main())
    assert len(gen.calls) == 2  # [3 + 3] then [3 + 3]: a request is never split across batches
    with torch.inference_mode():
        for r, o in zip(reqs, outs):
            torch.testing.assert_close(o, gen(r.latents, r.labels), atol=1e-5, rtol=0)


def test_zero_wait_serves_sequential_requests_one_pass_each() -> None:
    gen = CountingGenerator(make_generator())
    reqs = [request(i, n=2, label=1) for i in range(3)]
    asyncio.run(serve_alone(gen, reqs, max_batch=16))
    assert len(gen.calls) == 3


def test_cancelled_request_is_skipped_and_others_served() -> None:
    gen = CountingGenerator(make_generator())

    async def main() -> tuple[torch.Tensor, bool]:
        b = ImageBatcher(gen, max_batch=8, max_wait_ms=100)
        await b.start()
        try:
            t1 = asyncio.create_task(b.generate(request(1, 2, 0)))
            t2 = asyncio.create_task(b.generate(request(2, 2, 5)))
            await asyncio.sleep(0)  # both queued, collector waiting for more
            t1.cancel()
            out = await t2
            return out, t1.cancelled()
        finally:
            await b.stop()

    out, cancelled = asyncio.run(main())
    assert cancelled and out.shape == (2, 1, 32, 32)
    assert len(gen.calls) == 1


def test_forward_error_reaches_every_request_and_batcher_survives() -> None:
    gen = make_generator()
    fail = {"on": True}
    real_forward = gen.forward

    def flaky(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if fail["on"]:
            raise RuntimeError("boom")
        return real_forward(z, labels)

    gen.forward = flaky  # type: ignore[method-assign]

    async def main() -> tuple[list[object], torch.Tensor]:
        b = ImageBatcher(gen, max_batch=8, max_wait_ms=20)
        await b.start()
        try:
            res = await asyncio.gather(
                b.generate(request(1, 1, 0)), b.generate(request(2, 1, 1)), return_exceptions=True
            )
            fail["on"] = False
            ok = await b.generate(request(3, 1, 2))
            return list(res), ok
        finally:
            await b.stop()

    res, ok = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in res)
    assert ok.shape == (1, 1, 32, 32)


def test_stop_drains_queued_requests_then_refuses() -> None:
    gen = CountingGenerator(make_generator())

    async def main() -> tuple[list[torch.Tensor], ImageBatcher]:
        b = ImageBatcher(gen, max_batch=2, max_wait_ms=1000)
        await b.start()
        tasks = [asyncio.create_task(b.generate(request(i, 1, i))) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop()  # must not wait out max_wait nor drop the five queued requests
        outs = [t.result() for t in tasks]
        assert not b.running
        with pytest.raises(BatcherNotRunning):
            await b.generate(request(9, 1, 0))
        return outs, b

    outs, b = asyncio.run(main())
    assert len(outs) == 5 and b.requests_served == 5
    assert len(gen.calls) == 3  # 2 + 2 + 1


def test_generate_before_start_and_bad_requests() -> None:
    b = ImageBatcher(make_generator(), max_batch=4, max_wait_ms=1)

    async def main() -> None:
        with pytest.raises(BatcherNotRunning):
            await b.generate(request(0, 1, 0))
        await b.start()
        try:
            with pytest.raises(ValueError, match="latents"):
                await b.generate(ImageRequest(torch.zeros(1, CFG.z_dim + 1), torch.zeros(1, dtype=torch.long)))
            with pytest.raises(ValueError, match="labels"):
                await b.generate(ImageRequest(torch.zeros(2, CFG.z_dim), torch.zeros(1, dtype=torch.long)))
            with pytest.raises(ValueError, match="labels must lie"):
                await b.generate(ImageRequest(torch.zeros(1, CFG.z_dim), torch.tensor([10])))
        finally:
            await b.stop()

    asyncio.run(main())
    with pytest.raises(ValueError):
        ImageBatcher(make_generator(), max_batch=0)

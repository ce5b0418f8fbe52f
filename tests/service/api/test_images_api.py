"""`POST /v1/images/generations` with the shipped GAN: OpenAI client, determinism, errors, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from model_core.gan import Generator, generate, load_gan, to_uint8
from service.api.errors import install_error_handlers
from service.api.images import router
from service.api.state import ServerState
from service.config import Settings
from service.engine.images import ImageBatcher
from tests.service.server_utils import InProcessServer, serve_in_process

URL = "/v1/images/generations"


def make_app(generator: Generator, max_batch: int = 32, max_wait_ms: float = 10) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = ImageBatcher(generator, max_batch=max_batch, max_wait_ms=max_wait_ms)
        await batcher.start()
        app.state.server.image_batcher = batcher
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(lifespan=lifespan)
    app.state.server = ServerState(Settings())
    install_error_handlers(app)
    app.include_router(router)
    return app


@pytest.fixture(scope="module")
def gan() -> Generator:
    return load_gan()


@pytest.fixture(scope="module")
def client(gan: Generator) -> Iterator[TestClient]:
    with TestClient(make_app(gan)) as c:
        yield c


@pytest.fixture(scope="module")
def server(gan: Generator) -> Iterator[InProcessServer]:
    with serve_in_process(make_app(gan)) as live:
        yield live


def png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def post(client: TestClient, **body: object) -> Any:
    return client.post(URL, json=body)


def test_openai_client_gets_pngs_of_the_requested_size(server: InProcessServer, gan: Generator) -> None:
    oa = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="unused", max_retries=0, http_client=server.http_client()
    )
    res = oa.images.generate(
        model="gan-digits",
        prompt="seven",
        n=3,
        size="64x64",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert res.data is not None and len(res.data) == 3
    imgs = [png(d.b64_json or "") for d in res.data]
    assert all(i.size == (64, 64) and i.mode == "L" for i in imgs)
    again = oa.images.generate(
        model="gan-digits",
        prompt="7",
        n=3,
        size="64x64",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"seed": 42},
    )
    assert again.data is not None
    assert [d.b64_json for d in again.data] == [d.b64_json for d in res.data]

    native = oa.images.generate(prompt="7", n=3, size="32x32", extra_body={"seed": 42})  # type: ignore[arg-type]
    assert native.data is not None
    got = np.stack([np.asarray(png(d.b64_json or "")) for d in native.data])  # (3, 32, 32)
    ref = to_uint8(generate(gan, [7, 7, 7], [42, 43, 44])).numpy()
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # batched (padded) vs reference forward

    with pytest.raises(openai.BadRequestError) as e:
        oa.images.generate(prompt="a cat", response_format="b64_json")
    assert e.value.status_code == 400 and "'seven'" in str(e.value)


def test_default_size_and_response_shape(client: TestClient) -> None:
    r = post(client, prompt="3", seed=1)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert body["seed"] == 1 and body["class_label"] == 3 and len(body["data"]) == 1
    assert png(body["data"][0]["b64_json"]).size == (256, 256)
    nulls = post(client, prompt="3", seed=1, n=None, size=None, response_format=None).json()
    assert nulls["data"] == body["data"]  # explicit nulls mean the defaults


def test_same_seed_same_bytes_and_seeds_are_per_image(client: TestClient) -> None:
    def images(**kw: object) -> list[str]:
        r = post(client, size="32x32", **kw)
        assert r.status_code == 200, r.text
        return [d["b64_json"] for d in r.json()["data"]]

    a = images(prompt="five", n=4, seed=123)
    assert images(prompt="5", n=4, seed=123) == a
    assert images(class_label=5, n=4, seed=123) == a
    assert images(prompt="5", class_label=5, n=4, seed=123) == a
    assert images(prompt="5", n=1, seed=125) == a[2:3]  # image i comes from seed + i
    assert len(set(a)) == 4  # different seeds, different images
    assert images(prompt="6", n=4, seed=123) != a
    unseeded = post(client, prompt="5", size="32x32").json()
    assert isinstance(unseeded["seed"], int)
    assert images(prompt="5", seed=unseeded["seed"]) == [unseeded["data"][0]["b64_json"]]


def test_truncation(client: TestClient) -> None:
    def one(**kw: object) -> str:
        r = post(client, prompt="2", size="32x32", seed=9, **kw)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    assert one(truncation=0.3) == one(truncation=0.3)
    assert one(truncation=0.3) != one()
    assert one(truncation=50.0) == one()  # nothing exceeds psi = 50


def test_interpolation_frames_run_from_seed_a_to_seed_b(client: TestClient) -> None:
    r = post(client, prompt="8", size="32x32", interpolate={"seeds": [11, 99], "steps": 6})
    assert r.status_code == 200, r.text
    frames = [d["b64_json"] for d in r.json()["data"]]
    assert len(frames) == 6 and len(set(frames)) == 6
    start = post(client, prompt="8", size="32x32", seed=11).json()["data"][0]["b64_json"]
    end = post(client, prompt="8", size="32x32", seed=99).json()["data"][0]["b64_json"]
    assert frames[0] == start and frames[-1] == end
    # neighbouring frames are closer than the endpoints are to each other
    arr = [np.asarray(png(f), dtype=float) for f in frames]
    steps = [np.abs(arr[i + 1] - arr[i]).mean() for i in range(5)]
    assert max(steps) < np.abs(arr[-1] - arr[0]).mean()


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"prompt": "a cat"}, "prompt", "'nine'"),
        ({"prompt": "10"}, "prompt", "'0'"),
        ({}, "prompt", "accepted prompts"),
        ({"prompt": "1", "size": "100x50"}, "size", "square"),
        ({"prompt": "1", "size": "1024x1024"}, "size", "256"),
        ({"prompt": "1", "size": "16x16"}, "size", "32"),
        ({"prompt": "1", "size": "big"}, "size", "NxN"),
        ({"prompt": "1", "n": 0}, "n", "1..16"),
        ({"prompt": "1", "n": 17}, "n", "1..16"),
        ({"prompt": "1", "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": "1", "class_label": 2}, "class_label", "prompt names class 1"),
        ({"class_label": 10}, "class_label", "0..9"),
        ({"prompt": "1", "seed": -1}, "seed", "seed"),
        ({"prompt": "1", "truncation": 0.0}, "truncation", "truncation"),
        ({"prompt": "1", "interpolate": {"seeds": [1], "steps": 4}}, "interpolate.seeds", "two"),
        ({"prompt": "1", "interpolate": {"seeds": [1, 2], "steps": 1}}, "interpolate.steps", "2..32"),
        ({"prompt": "1", "n": 2, "interpolate": {"seeds": [1, 2]}}, "n", "interpolate"),
        ({"prompt": "1", "seed": 3, "interpolate": {"seeds": [1, 2]}}, "seed", "interpolate"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(client: TestClient, body: dict, param: str, needle: str) -> None:
    r = client.post(URL, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert needle in err["message"]


def test_503_without_a_batcher() -> None:
    app = FastAPI()
    app.state.server = ServerState(Settings())  # (no image_batcher: the GAN is off)
    install_error_handlers(app)
    app.include_router(router)
    with TestClient(app) as c:
        r = c.post(URL, json={"prompt": "1"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


def test_concurrent_http_requests_share_forward_passes(gan: Generator) -> None:
    app = make_app(gan, max_batch=32, max_wait_ms=100)
    bodies = [{"prompt": str(i % 10), "n": 1 + i % 2, "seed": 1000 + i, "size": "32x32"} for i in range(16)]

    async def main() -> tuple[list[list[str]], list[list[str]], int]:
        async with app.router.lifespan_context(app):
            batcher: ImageBatcher = app.state.server.image_batcher
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:

                async def call(b: dict) -> list[str]:
                    r = await ac.post(URL, json=b)
                    assert r.status_code == 200, r.text
                    return [d["b64_json"] for d in r.json()["data"]]

                together = await asyncio.gather(*(call(b) for b in bodies))
                passes = batcher.forward_passes
                alone = [await call(b) for b in bodies]
        return list(together), alone, passes

    together, alone, passes = asyncio.run(main())
    assert passes < len(bodies)
    assert together == alone  # same bytes whether batched with others or served alone
    assert torch.equal(torch.tensor([len(t) for t in together]), torch.tensor([1 + i % 2 for i in range(16)]))


def test_draining_server_refuses_new_images(client) -> None:
    client.app.state.server.draining = True
    try:
        r = client.post("/v1/images/generations", json={"prompt": "3"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining" and r.headers["retry-after"]
    finally:
        client.app.state.server.draining = False

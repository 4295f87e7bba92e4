"""The Kubernetes manifests in deploy/kubernetes and docs/autoscaling.md: every file parses,
every resource has what its kind needs, the pieces refer to each other correctly, the
shipped cloud.toml files load, and only the worker's real metric names are used."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from fogline.cloud_service import CloudConfig

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
DOC = REPO / "docs" / "autoscaling.md"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
ADAPTER_VALUES = K8S / "autoscaling" / "hpa" / "prometheus-adapter-values.yaml"

# The worker's metric names (with a histogram's series suffixes) and the two names the
# prometheus-adapter rules derive from them.
METRICS = {
    "fogline_model_requests_total",
    "fogline_model_queue_depth",
    "fogline_model_queue_seconds",
    "fogline_model_compute_seconds",
    "fogline_model_batch_size",
    "fogline_model_request_seconds",
    "fogline_model_arrival_rate",
    "fogline_model_latency_p99_seconds",
    "fogline_gpu_memory_used_bytes",
    "fogline_http_requests_total",
}
HISTOGRAMS = {
    "fogline_model_queue_seconds",
    "fogline_model_compute_seconds",
    "fogline_model_batch_size",
    "fogline_model_request_seconds",
}
DERIVED = {"fogline_queue_depth", "fogline_request_p99_seconds"}
PROBE_PATHS = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def kustomization(folder: Path) -> dict[str, Any]:
    (doc,) = documents(folder / "kustomization.yaml")
    return doc


def resources(folder: Path) -> Iterator[dict[str, Any]]:
    """Every resource a kustomization lists, following bases (patches not applied)."""
    for entry in kustomization(folder).get("resources", []):
        target = (folder / entry).resolve()
        if target.is_dir():
            yield from resources(target)
        else:
            yield from documents(target)


def all_resources() -> list[dict[str, Any]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for folder in KUSTOMIZATIONS:
        for doc in resources(folder):
            seen[(doc["kind"], doc["metadata"]["name"])] = doc
    return list(seen.values())


def one(kind: str, name: str = "fogline-cloud") -> dict[str, Any]:
    matches = [d for d in all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def test_every_yaml_file_parses_and_every_resource_names_its_kind() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 12
    for path in files:
        for doc in documents(path):
            assert isinstance(doc, dict), path
            if path == ADAPTER_VALUES:
                continue
            assert doc.get("apiVersion"), path
            assert doc.get("kind"), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_every_file_is_used_by_a_kustomization_and_every_reference_exists() -> None:
    used = {ADAPTER_VALUES}  # helm values, installed with helm (see its kustomization)
    for folder in KUSTOMIZATIONS:
        k = kustomization(folder)
        used.add(folder / "kustomization.yaml")
        for entry in k.get("resources", []):
            assert (folder / entry).exists(), (folder, entry)
            used.add((folder / entry).resolve())
        for patch in k.get("patches", []):
            assert (folder / patch["path"]).is_file(), (folder, patch)
            used.add(folder / patch["path"])
        for generator in k.get("secretGenerator", []):
            for file in generator["files"]:
                assert (folder / file).is_file(), (folder, file)
                used.add(folder / file)
    shipped = {p for p in K8S.rglob("*") if p.is_file()}
    assert shipped - {p.resolve() for p in used} == set()


def test_patches_target_a_resource_of_their_base() -> None:
    for folder in KUSTOMIZATIONS:
        base = {(d["kind"], d["metadata"]["name"]) for d in resources(folder)}
        for patch in kustomization(folder).get("patches", []):
            for doc in documents(folder / patch["path"]):
                assert (doc["kind"], doc["metadata"]["name"]) in base, (folder, patch)


def test_the_deployment_is_probed_resourced_and_locked_down() -> None:
    deployment = one("Deployment")
    spec = deployment["spec"]
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["replicas"] >= 1
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    assert container["image"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in PROBE_PATHS, probe
        assert get["port"] in ports, probe
    assert container["readinessProbe"]["httpGet"]["path"] != "/healthz"
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert container["args"][:2] == ["cloud", "serve"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["http"])


def test_the_gpu_variant_asks_for_a_gpu_and_tolerates_gpu_nodes() -> None:
    (patch,) = documents(K8S / "gpu" / "deployment-gpu.yaml")
    pod = patch["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    base_probe = one("Deployment")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    allowance = (
        container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    )
    assert allowance > base_probe["periodSeconds"] * base_probe["failureThreshold"]


def test_the_service_monitor_and_pdb_find_the_pods_through_the_service() -> None:
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {
        p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    service = one("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    monitor = one("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def adapter_rules() -> dict[str, dict[str, Any]]:
    (values,) = documents(ADAPTER_VALUES)
    rules = values["rules"]["custom"]
    for rule in rules:
        assert {"seriesQuery", "resources", "name", "metricsQuery"} <= rule.keys()
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    return {rule["name"]["as"]: rule for rule in rules}


def test_the_hpa_scales_the_deployment_on_metrics_the_adapter_defines() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    rules = adapter_rules()
    kinds = {}
    for metric in hpa["spec"]["metrics"]:
        body = metric[metric["type"].lower()]
        assert body["metric"]["name"] in rules
        kinds[body["metric"]["name"]] = metric["type"]
    assert kinds == {"fogline_queue_depth": "Pods", "fogline_request_p99_seconds": "Object"}
    assert "pod" in rules["fogline_queue_depth"]["resources"]["overrides"]
    assert "service" in rules["fogline_request_p99_seconds"]["resources"]["overrides"]
    assert 'lane!="bulk"' in rules["fogline_queue_depth"]["metricsQuery"]
    assert "histogram_quantile(0.99" in rules["fogline_request_p99_seconds"]["metricsQuery"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 180
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_the_keda_alternative_queries_queue_depth_and_p99_with_the_same_behaviour() -> None:
    scaled = one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    depth = triggers["queue-depth"]["metadata"]
    assert depth["query"].startswith("sum(fogline_model_queue_depth{")
    p99 = triggers["p99-latency"]
    assert p99["metricType"] == "Value"
    assert "histogram_quantile(0.99" in p99["metadata"]["query"]
    assert "fogline_model_request_seconds_bucket" in p99["metadata"]["query"]
    for trigger in triggers.values():
        assert float(trigger["metadata"]["threshold"]) > 0
        assert trigger["metadata"]["serverAddress"].startswith("http")
    keda_behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert keda_behavior == one("HorizontalPodAutoscaler")["spec"]["behavior"]


def test_the_queue_depth_target_is_one_batch_of_the_shipped_config() -> None:
    hpa = one("HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    threshold = one("ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"]
    for toml in sorted(K8S.rglob("cloud.toml")):
        cfg = CloudConfig.from_toml(toml)
        assert int(pods["target"]["averageValue"]) == cfg.batching.max_batch_size, toml
        assert int(threshold) == cfg.batching.max_batch_size, toml


def test_the_shipped_cloud_configs_load_and_join_the_shared_subscription() -> None:
    configs = {p.parent.name: CloudConfig.from_toml(p) for p in K8S.rglob("cloud.toml")}
    assert set(configs) == {"base", "gpu"}
    for cfg in configs.values():
        assert cfg.share_group == "fogline-cloud"
        assert cfg.http.port == 8080
        assert cfg.tensorrt.engine_cache_dir == Path("/var/cache/fogline/engines")
        assert make_url(cfg.store.url).password is None  # PGPASSWORD comes from a Secret
        assert cfg.broker.tls  # the TLS listener of deploy/mosquitto/mosquitto.conf
        assert cfg.broker.username == "fogline-cloud"  # the account fogline.acl names
    assert configs["gpu"].tensorrt.fp16


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bfogline_[a-z0-9_]+", text))


def known(name: str) -> bool:
    if name in METRICS or name in DERIVED:
        return True
    base, _, suffix = name.rpartition("_")
    return base in HISTOGRAMS and suffix in {"bucket", "sum", "count"}


def test_manifests_and_docs_use_only_the_workers_metric_names() -> None:
    texts = [p.read_text() for p in K8S.rglob("*.yaml")] + [DOC.read_text()]
    names = set().union(*(metric_names(t) for t in texts))
    assert {"fogline_model_queue_depth", "fogline_model_request_seconds_bucket"} <= names
    assert sorted(n for n in names if not known(n)) == []


def test_the_doc_spells_out_the_promql_and_the_reasoning() -> None:
    doc = DOC.read_text()
    for needle in (
        "sum(fogline_model_queue_depth",
        "histogram_quantile(0.99",
        "Why queue depth, not CPU",
        "stabilizationWindowSeconds: 300",
        "$share/fogline-cloud/",
        "deploy/kubernetes/autoscaling/keda",
        "prometheus-adapter-values.yaml",
    ):
        assert needle in doc, needle


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_each_kustomization_renders(folder: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert rendered
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fogline", doc["kind"]
    deployments = [d for d in rendered if d["kind"] == "Deployment"]
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        secret = next(v for v in pod["volumes"] if v["name"] == "config")["secret"]
        assert secret["secretName"].startswith("fogline-cloud-config-")  # hashed by content
        gpus = pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == (folder.name == "gpu")

"""Every manifest in deploy/k8s, validated offline against the vendored Kubernetes and KEDA schemas
(deploy/schemas/manifests.schema.json, strict: unknown fields are errors), then read as an operator would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.settings import REPO_ROOT, Settings

K8S = REPO_ROOT / "deploy" / "k8s"
SCHEMAS = json.loads((REPO_ROOT / "deploy" / "schemas" / "manifests.schema.json").read_text())


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
                  for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def schema_errors(doc: dict[str, Any]) -> list[str]:
    kind = f"{doc['apiVersion']}/{doc['kind']}"
    if kind not in SCHEMAS["x-kinds"]:
        return [f"no vendored schema for {kind}: add it in scripts/vendor_deploy_schemas.py"]
    schema = {"$schema": SCHEMAS["$schema"], "$ref": SCHEMAS["x-kinds"][kind], "$defs": SCHEMAS["$defs"]}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def by_name(kind: str, name: str) -> dict[str, Any]:
    return next(doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[where for where, _ in manifests()])
def test_manifest_matches_its_schema(where, doc):
    assert schema_errors(doc) == []


def test_the_schemas_refuse_what_the_cluster_would_refuse():
    worker = json.loads(json.dumps(by_name("Deployment", "dgserve-worker")))
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # a typo kubectl would reject
    assert any("terminationGracePeriod" in error for error in schema_errors(worker))
    scaled = json.loads(json.dumps(by_name("ScaledObject", "dgserve-worker")))
    scaled["spec"]["cooldown"] = 60
    del scaled["spec"]["triggers"][0]["metadata"]
    errors = schema_errors(scaled)
    assert any("cooldown" in error for error in errors) and any("metadata" in error for error in errors)


def _container(deployment: str) -> dict[str, Any]:
    return by_name("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def test_model_cache_and_hf_token_reach_api_and_workers():
    config = by_name("ConfigMap", "dgserve")["data"]
    claim = by_name("PersistentVolumeClaim", "dgserve-hf-cache")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for deployment in ("dgserve-api", "dgserve-worker"):
        pod = by_name("Deployment", deployment)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        secrets = [source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source]
        assert "dgserve-hf" in secrets and "HF_TOKEN" in by_name("Secret", "dgserve-hf")["stringData"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert volumes[mounts[config["HF_HOME"]]]["persistentVolumeClaim"]["claimName"] == "dgserve-hf-cache"


def test_worker_liveness_reads_the_heartbeat_file_the_worker_writes():
    worker = _container("dgserve-worker")
    heartbeat = Path(_env(worker)["DGSERVE_WORKER_HEARTBEAT_FILE"])
    assert any(heartbeat.is_relative_to(mount["mountPath"]) for mount in worker["volumeMounts"])
    for probe in ("livenessProbe", "startupProbe"):
        assert worker[probe]["exec"]["command"][:3] == ["python", "-m", "worker.heartbeat_probe"]
    grace = float(_env(worker)["DGSERVE_WORKER_SHUTDOWN_GRACE_SECONDS"])
    pod = by_name("Deployment", "dgserve-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= grace + 30  # drain, then time for Celery to exit
    assert "kill -TERM 1" in " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])


def test_api_readiness_survives_workers_being_down():
    api = _container("dgserve-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz/read"
    from services.api.routes_ops import router

    assert {"/readyz/read", "/readyz", "/healthz"} <= {route.path for route in router.routes}


def test_prometheus_discovers_every_annotated_pod():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml").read_text())
    relabels = config["scrape_configs"][0]["relabel_configs"]
    sources = {label for rule in relabels for label in rule.get("source_labels", [])}
    assert config["scrape_configs"][0]["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert {"__meta_kubernetes_pod_annotation_prometheus_io_scrape",
            "__meta_kubernetes_pod_annotation_prometheus_io_port", "__meta_kubernetes_pod_label_app"} <= sources
    scraped = [doc for _, doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet")]
    assert len(scraped) == 3
    for doc in scraped:
        template = doc["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {port["containerPort"] for c in template["spec"]["containers"] for port in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, doc["metadata"]["name"]
        assert template["metadata"]["labels"]["app"].startswith("dgserve-")  # the job alerts.yml matches


def test_keda_scales_the_worker_on_its_model_queue():
    scaled = by_name("ScaledObject", "dgserve-worker")["spec"]
    model = by_name("ConfigMap", "dgserve")["data"]["DGSERVE_MODEL"]
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == Settings(model=model).queue_name
    assert scaled["scaleTargetRef"]["name"] == "dgserve-worker" and scaled["cooldownPeriod"] >= 300
    assert 0 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    hpa = by_name("HorizontalPodAutoscaler", "dgserve-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "dgserve-api" and hpa["minReplicas"] >= 2

"""Write deploy/schemas/manifests.schema.json: the JSON Schemas that tests/deploy/test_k8s_manifests.py
validates every manifest of deploy/k8s against, offline.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && unzip -q /tmp/kv/*.whl -d /tmp/kv
    python -m scripts.vendor_deploy_schemas --kubernetes /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.34.0-local-strict

Kubernetes: the strict schemas (unknown fields refused) of the kinds deploy/k8s uses, as shipped by the
`kubernetes-validate` PyPI package (generated from the Kubernetes OpenAPI document), pruned to the definitions
those kinds reach and without descriptions. KEDA: the ScaledObject (keda.sh/v1alpha1) written here from the
field list of KEDA 2's CRD (as typed in the `@kubernetes-models/keda` npm package), equally strict.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

KIND_FILES = {
    "v1/ConfigMap": "configmap-v1.json", "v1/Secret": "secret-v1.json", "v1/Service": "service-v1.json",
    "v1/PersistentVolumeClaim": "persistentvolumeclaim-v1.json", "apps/v1/Deployment": "deployment-apps-v1.json",
    "apps/v1/StatefulSet": "statefulset-apps-v1.json",
    "autoscaling/v2/HorizontalPodAutoscaler": "horizontalpodautoscaler-autoscaling-v2.json",
    "policy/v1/PodDisruptionBudget": "poddisruptionbudget-policy-v1.json",
}
REF_PREFIX = re.compile(r"^/api/_definitions\.json#/\$defs/")


def _int(minimum: int = 0) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def keda_scaled_object() -> dict[str, Any]:
    """keda.sh/v1alpha1 ScaledObject (KEDA 2.x), unknown fields refused."""
    meta = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    trigger = _object({
        "type": {"type": "string", "minLength": 1}, "name": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "authenticationRef": _object({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]}, "useCachedMetrics": {"type": "boolean"},
    }, ("type", "metadata"))
    advanced = _object({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        "horizontalPodAutoscalerConfig": _object({
            "name": {"type": "string"},
            "behavior": {"$ref": "#/$defs/io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}}),
        "scalingModifiers": _object({key: {"type": "string"} for key in
                                     ("formula", "target", "activationTarget", "metricType")}),
    })
    spec = _object({
        "scaleTargetRef": _object({key: {"type": "string"} for key in
                                   ("name", "kind", "apiVersion", "envSourceContainerName")}, ("name",)),
        "pollingInterval": _int(1), "cooldownPeriod": _int(), "initialCooldownPeriod": _int(),
        "idleReplicaCount": _int(), "minReplicaCount": _int(), "maxReplicaCount": _int(1), "advanced": advanced,
        "fallback": _object({"failureThreshold": _int(1), "replicas": _int(),
                             "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                                   "currentReplicasIfLower"]}}, ("failureThreshold", "replicas")),
        "triggers": {"type": "array", "minItems": 1, "items": trigger},
    }, ("scaleTargetRef", "triggers"))
    return _object({"apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
                    "metadata": meta, "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


def _clean(node: Any) -> Any:
    """Drop descriptions and point refs into this one document."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            out[key] = REF_PREFIX.sub("#/$defs/", value) if key == "$ref" and isinstance(value, str) else _clean(value)
        return out
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return node


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix("#/$defs/")} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node))
    return set()


def def_name(kind: str) -> str:
    """`apps/v1/Deployment` -> `kind.apps.v1.Deployment` (no "/": it would split the JSON pointer)."""
    return "kind." + kind.replace("/", ".")


def _kind_schema(path: Path) -> dict[str, Any]:
    schema = _clean(json.loads(path.read_text()))
    for key in ("$id", "$schema"):  # an $id would move the base URI away from this document's #/$defs
        schema.pop(key, None)
    return schema


def build(kubernetes_dir: Path) -> dict[str, Any]:
    library = _clean(json.loads((kubernetes_dir / "_definitions.json").read_text())["$defs"])
    defs: dict[str, Any] = {def_name(kind): _kind_schema(kubernetes_dir / name) for kind, name in KIND_FILES.items()}
    defs[def_name("keda.sh/v1alpha1/ScaledObject")] = keda_scaled_object()
    pending = set().union(*(_refs(schema) for schema in defs.values()))
    while pending:
        name = pending.pop()
        if name not in defs:
            defs[name] = library[name]
            pending |= _refs(defs[name]) - defs.keys()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"generated by scripts/vendor_deploy_schemas.py from {kubernetes_dir.name}",
            "x-kinds": {kind: f"#/$defs/{def_name(kind)}" for kind in [*KIND_FILES, "keda.sh/v1alpha1/ScaledObject"]},
            "$defs": dict(sorted(defs.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes", type=Path, required=True, help="a vX.Y.Z-local-strict schema folder")
    parser.add_argument("--out", type=Path, default=Path("deploy/schemas/manifests.schema.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(build(args.kubernetes), indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()

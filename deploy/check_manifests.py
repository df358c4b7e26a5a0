"""Checks on rendered Kubernetes manifests that a JSON schema cannot express: references between
objects resolve, and every xmr workload keeps the production rules (probes, resources, non-root).

Usage: python deploy/check_manifests.py RENDERED.yaml [--external-secret NAME ...]
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob"}


def pod_spec(doc: Doc) -> Doc:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(doc: Doc) -> dict[str, str]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["metadata"].get("labels", {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(docs: list[Doc], external_secrets: set[str]) -> Iterator[str]:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for doc in workloads:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        security = spec.get("securityContext", {})
        if not security.get("runAsNonRoot"):
            yield f"{where}: pod securityContext.runAsNonRoot is not true"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for claim in sorted(claims - {n for k, n in names if k == "PersistentVolumeClaim"}):
            yield f"{where}: PersistentVolumeClaim {claim} is not defined"
        for c in spec["containers"]:
            cwhere = f"{where} container {c['name']}"
            if ":" not in c["image"].rsplit("/", 1)[-1] or c["image"].endswith(":latest"):
                yield f"{cwhere}: image {c['image']!r} has no fixed tag"
            if "memory" not in c.get("resources", {}).get("limits", {}):
                yield f"{cwhere}: no memory limit"
            if "cpu" not in c.get("resources", {}).get("requests", {}):
                yield f"{cwhere}: no cpu request"
            ctx = c.get("securityContext", {})
            if ctx.get("allowPrivilegeEscalation") is not False or not ctx.get(
                "readOnlyRootFilesystem"
            ):
                yield f"{cwhere}: privilege escalation allowed or root filesystem writable"
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    ref = source.get(key, {}).get("name")
                    if ref and (kind, ref) not in names and ref not in external_secrets:
                        yield f"{cwhere}: {kind} {ref} is not defined"
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            for c in pod_spec(doc)["containers"]:
                paths = {probe: c.get(probe, {}).get("httpGet", {}).get("path")
                         for probe in ("readinessProbe", "livenessProbe")}
                if paths != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
                    yield f"Deployment/{name}: probes are {paths}, want /readyz and /healthz"
        if doc["kind"] == "Service":
            selector = doc["spec"].get("selector", {})
            if not any(selects(selector, pod_labels(w)) for w in workloads):
                yield f"Service/{name}: selector {selector} matches no pod template"
        if doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
            if not any(selects(selector, pod_labels(w)) for w in workloads):
                yield f"PodDisruptionBudget/{name}: selector {selector} matches no pod template"
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in names:
                yield f"HorizontalPodAutoscaler/{name}: target {target['name']} is not defined"
            deployments = [d for d in docs if d["kind"] == target["kind"]
                           and d["metadata"]["name"] == target["name"]]
            if any("replicas" in d["spec"] for d in deployments):
                yield f"{target['kind']}/{target['name']}: sets replicas while an HPA owns them"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path)
    parser.add_argument("--external-secret", action="append", default=[],
                        help="a Secret created outside the manifests")
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text(encoding="utf-8")) if d]
    found = list(problems(docs, set(args.external_secret)))
    for line in found:
        print(f"{args.rendered}: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

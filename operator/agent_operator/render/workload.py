"""The Deployment of one colour and its hardened pod template."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from agent_contract.layout import (
    CONFIG_FILE_KEY,
    CONFIG_PATH,
    DATA_DIR,
    DATABASE_URL_ENV,
    KEYS_DIR,
    MODEL_API_KEY_ENV,
    MODEL_CA_DIR,
    MODEL_CA_FILE,
    RUNTIME_PORT,
    USERS_DIR,
    USERS_FILE_KEY,
)
from agent_operator.render.common import (
    ANNOTATION_REVISION,
    ANNOTATION_SPEC,
    LABEL_COLOR,
    LABEL_REVISION,
    LABEL_VERSION,
    RUNTIME_UID,
    Manifest,
    common_labels,
    config_map_name,
    deployment_name,
    encode_spec,
    key_secret_name,
    metadata,
    selector_labels,
    service_account_name,
    version_labels,
)
from agent_operator.spec import Color, EnterpriseAgent

RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": RUNTIME_UID,
    "runAsGroup": RUNTIME_UID,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
        "successThreshold": 1,
    }


def _operator_env(agent: EnterpriseAgent, revision: str, color: Color | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "AGENT_NAME", "value": agent.name},
        {"name": "AGENT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "AGENT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "AGENT_REVISION", "value": revision},
        {"name": "AGENT_CONFIG", "value": CONFIG_PATH},
    ]
    if color is not None:
        env.append({"name": "AGENT_COLOR", "value": color.value})
    postgres = agent.spec.state.postgres
    if postgres is not None:
        # Only a reference: the URI (with its password) stays in the Secret, out of every object we write.
        secret = {"name": postgres.secret_ref.name, "key": postgres.secret_ref.key}
        env.append({"name": DATABASE_URL_ENV, "valueFrom": {"secretKeyRef": secret}})
    model = agent.spec.model
    if model is not None and model.api_key_secret_ref is not None:
        # As DATABASE_URL: a reference only, so the key is in no object the operator writes.
        key_ref = {"name": model.api_key_secret_ref.name, "key": model.api_key_secret_ref.key}
        env.append({"name": MODEL_API_KEY_ENV, "valueFrom": {"secretKeyRef": key_ref}})
    return env


def build_pod_template(agent: EnterpriseAgent, revision: str, color: Color | None) -> Manifest:
    """The pod template of one colour at ``revision``."""
    spec = agent.spec
    labels = {**spec.pod.labels, **common_labels(agent), **version_labels(agent), **selector_labels(agent, color)}
    if revision:
        labels[LABEL_REVISION] = revision
    annotations = {
        **spec.pod.annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(RUNTIME_PORT),
        "prometheus.io/path": "/metrics",
    }
    if revision:
        annotations[ANNOTATION_REVISION] = revision
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        {"name": "data", "emptyDir": {"sizeLimit": str(spec.data_volume_size_limit)}},
        {"name": "config", "configMap": {"name": config_map_name(agent, revision), "defaultMode": 0o440}},
        {"name": "keys", "secret": {"secretName": key_secret_name(agent), "defaultMode": 0o440}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the pod's own emptyDir
        {"name": "data", "mountPath": DATA_DIR},
        {"name": "config", "mountPath": CONFIG_PATH, "subPath": CONFIG_FILE_KEY, "readOnly": True},
        {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
    ]
    if spec.security.users_secret_ref is not None:
        volumes.append(
            {
                "name": "users",
                "secret": {
                    "secretName": spec.security.users_secret_ref.name,
                    "defaultMode": 0o440,
                    "items": [{"key": USERS_FILE_KEY, "path": USERS_FILE_KEY}],
                },
            }
        )
        mounts.append({"name": "users", "mountPath": USERS_DIR, "readOnly": True})
    ca_bundle = spec.model.ca_bundle if spec.model is not None else None
    if ca_bundle is not None:
        # Only the bundle's key, under the file name the runtime config points at.
        volumes.append(
            {
                "name": "model-ca",
                "configMap": {
                    "name": ca_bundle.config_map_ref.name,
                    "defaultMode": 0o444,
                    "items": [{"key": ca_bundle.key, "path": PurePosixPath(MODEL_CA_FILE).name}],
                },
            }
        )
        mounts.append({"name": "model-ca", "mountPath": MODEL_CA_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy.value,
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "env": _operator_env(agent, revision, color)
        + [var.model_dump(by_alias=True, exclude_none=True) for var in spec.env],
        "resources": spec.resources.model_dump(by_alias=True),
        "startupProbe": _probe("/healthz", period=2, timeout=2, failures=60),
        "livenessProbe": _probe("/healthz", period=10, timeout=5, failures=3),
        "readinessProbe": _probe("/readyz", period=5, timeout=3, failures=2),
        # Give endpoints time to drop the pod before the runtime stops accepting requests.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.env_from:
        container["envFrom"] = [source.model_dump(by_alias=True, exclude_none=True) for source in spec.env_from]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(agent),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector_labels(agent, color)},
            }
        ],
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [ref.model_dump() for ref in spec.image_pull_secrets]
    if spec.pod.node_selector:
        pod_spec["nodeSelector"] = dict(spec.pod.node_selector)
    if spec.pod.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in spec.pod.tolerations
        ]
    if spec.pod.affinity:
        pod_spec["affinity"] = spec.pod.affinity
    if spec.pod.priority_class_name:
        pod_spec["priorityClassName"] = spec.pod.priority_class_name
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}


def _without(entry: Mapping[str, Any], *empty: str) -> dict[str, Any]:
    """``entry`` without those of the keys ``empty`` whose value is "" or an empty map."""
    return {key: value for key, value in entry.items() if not (key in empty and value in ("", {}))}


def as_stored(template: Manifest) -> Manifest:
    """The pod template as the API server stores it: without the zero values it drops (an env
    var's ``value: ""``, a toleration's empty key or value, empty resource maps), which the
    drift comparison would otherwise see missing on every resync. Applied to recorded templates
    too, so a revision rendered by an older operator does not drift forever."""
    spec = dict(template.get("spec") or {})
    containers = []
    for container in spec.get("containers") or []:
        container = dict(container)
        if "env" in container:
            container["env"] = [_without(var, "value") for var in container["env"]]
        if isinstance(container.get("resources"), Mapping):
            container["resources"] = _without(container["resources"], "requests", "limits")
        containers.append(container)
    if containers:
        spec["containers"] = containers
    if "tolerations" in spec:
        spec["tolerations"] = [_without(toleration, "key", "value") for toleration in spec["tolerations"]]
    return {**template, "spec": spec}


def build_deployment(
    agent: EnterpriseAgent,
    color: Color,
    revision: str,
    replicas: int,
    template: Manifest,
    recorded_spec: Mapping[str, Any],
) -> Manifest:
    """One colour's Deployment around ``template``, the pod template its revision was first
    rendered with, and ``recorded_spec``, the user's spec of that revision (kept on the Deployment
    for older `kubectl ea` plugins; the ControllerRevision is the record)."""
    version = (template.get("metadata", {}).get("labels") or {}).get(LABEL_VERSION)
    meta = metadata(
        agent,
        deployment_name(agent, color),
        {**({LABEL_VERSION: version} if version else {}), LABEL_COLOR: color.value, LABEL_REVISION: revision},
    )
    meta["annotations"] = {ANNOTATION_REVISION: revision, ANNOTATION_SPEC: encode_spec(dict(recorded_spec))}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(agent, color)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": agent.spec.rollout.progress_deadline_seconds,
            "template": as_stored(template),
        },
    }

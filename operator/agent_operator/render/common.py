"""Names, labels and constants shared by every renderer. Pure: no I/O, no kubernetes import."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from typing import Any

import orjson

from agent_operator.spec import GROUP, Color, EnterpriseAgent

MANAGER = "enterprise-agent-operator"
# Non-root uid/gid of the runtime image; fsGroup makes mounted keys readable to it.
RUNTIME_UID = 10001

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_VERSION = "app.kubernetes.io/version"
LABEL_COLOR = f"{GROUP}/color"
LABEL_REVISION = f"{GROUP}/revision"
LABEL_SERVICE_ROLE = f"{GROUP}/service-role"
ANNOTATION_REVISION = f"{GROUP}/revision"
ANNOTATION_ROTATE_KEYS = f"{GROUP}/rotate-keys"
# The spec a colour's Deployment was rendered from, so the operator can keep (and repair) the
# stable colour while the spec describes the preview, and `kubectl ea undo` can restore it.
ANNOTATION_SPEC = f"{GROUP}/spec"
# Requests from `kubectl ea abort|retry` (metadata, so they do not change the spec or generation).
ANNOTATION_ABORT = f"{GROUP}/abort"
ANNOTATION_RETRY = f"{GROUP}/retry"
# Asks the operator to set the spec back to the previous revision (kubectl ea undo, Argo CD's undo).
ANNOTATION_UNDO = f"{GROUP}/undo"
# The undo request whose spec the operator wrote back, set in the same write as the spec: a request
# whose answer never reached the status is not acted on twice.
ANNOTATION_UNDONE = f"{GROUP}/undone"

Manifest = dict[str, Any]


def deployment_name(agent: EnterpriseAgent, color: Color) -> str:
    return deployment_name_for(agent.name, color.value)


def deployment_name_for(agent_name: str, color: str) -> str:
    return f"{agent_name}-{color}"


def active_service_name(agent: EnterpriseAgent) -> str:
    return agent.name


def preview_service_name(agent: EnterpriseAgent) -> str:
    return f"{agent.name}-preview"


def config_map_name(agent: EnterpriseAgent, revision: str) -> str:
    return f"{agent.name}-config-{revision}" if revision else f"{agent.name}-config"


def key_secret_name(agent: EnterpriseAgent) -> str:
    return f"{agent.name}-keys"


def service_account_name(agent: EnterpriseAgent) -> str:
    return agent.name


def image_version(image: str) -> str:
    """The image tag as a label value ("" when the image has no usable tag)."""
    reference = image.split("@", 1)[0]
    tail = reference.rsplit("/", 1)[-1]
    tag = tail.split(":", 1)[1] if ":" in tail else ""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "", tag)[:63].strip("-_.")
    return tag


def common_labels(agent: EnterpriseAgent) -> dict[str, str]:
    """Labels on every child; the first two also select the agent's pods."""
    return {
        LABEL_NAME: agent.name,
        LABEL_INSTANCE: agent.name,
        LABEL_COMPONENT: "agent",
        LABEL_PART_OF: "enterprise-agent",
        LABEL_MANAGED_BY: MANAGER,
    }


def version_labels(agent: EnterpriseAgent) -> dict[str, str]:
    """The image tag as app.kubernetes.io/version: only on a colour's Deployment and pods, so a new
    image does not rewrite the labels of children a rollout must leave alone."""
    version = image_version(agent.spec.image)
    return {LABEL_VERSION: version} if version else {}


def selector_labels(agent: EnterpriseAgent, color: Color | None = None) -> dict[str, str]:
    labels = {LABEL_NAME: agent.name, LABEL_INSTANCE: agent.name}
    if color is not None:
        labels[LABEL_COLOR] = color.value
    return labels


def metadata(agent: EnterpriseAgent, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": agent.namespace, "labels": {**common_labels(agent), **(extra_labels or {})}}


def label_selector_string(labels: dict[str, str]) -> str:
    """The string form of an equality selector, as the scale subresource reports it."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def stable_hash(data: Any, length: int = 10) -> str:
    """A short hash of JSON-serialisable data that does not depend on dict order."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def json_bytes(data: Any) -> bytes:
    """Compact JSON of exactly its length, for what is kept a long while as JSON: orjson's own
    answer keeps its whole output buffer (a 120-byte document held 4 KiB). An integer beyond 64
    bits, which orjson refuses, is written by the standard library (a ControllerRevision's data
    takes any JSON, and kopf's watch parses it whole); orjson reads it back as a float."""
    try:
        return memoryview(orjson.dumps(data)).tobytes()
    except TypeError:
        return json.dumps(data, separators=(",", ":")).encode()


def fingerprint(data: Any) -> bytes:
    """A digest of JSON-serialisable data that does not depend on dict order: what is compared
    instead of keeping the data itself."""
    return hashlib.blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def encode_spec(spec: Any) -> str:
    """The spec as compact gzip+base64 JSON; a full spec stays well under the annotation limit.

    Whole floats are written as integers, as the API server stores them: the spec read back from a
    ControllerRevision says 5 where the agent's model said 5.0, and the annotation must not differ
    (it did, and every new agent's Deployment was written twice)."""
    raw = json.dumps(_whole_floats_as_ints(spec), sort_keys=True, separators=(",", ":")).encode()
    return base64.b64encode(gzip.compress(raw, mtime=0)).decode()


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    return value


def decode_spec(text: str) -> Any:
    """The inverse of :func:`encode_spec`; raises ValueError on anything else."""
    try:
        return json.loads(gzip.decompress(base64.b64decode(text, validate=True)))
    except (OSError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"not an encoded spec: {error}") from None

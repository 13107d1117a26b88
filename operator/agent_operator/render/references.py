"""The Secrets and ConfigMaps an agent's pods read that the operator does not own, and a digest of
what they hold for the revision.

Pure: the controller reads the objects (kube.py, by name) and passes them in as observed data. A
pod reads an env var's value (``valueFrom``, ``envFrom``, the model's API key, the database URI)
and its mounted CA bundle when it starts; a later change to them reaches no running pod. So their
content is part of the revision, like the spec: rotating the model key rolls out a new colour
through preview and analysis, and a bad key is caught there instead of in every pod at its next
restart.

Some references are only checked for existence: imagePullSecrets (their content reaches the
kubelet, not the runtime) and the users Secret (the runtime reads the mounted users file again
whenever it changes, so a user added or disabled takes effect in the running pods within the
kubelet's sync period, without a rollout).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent_contract.keyfiles import ENCRYPTION_PREFIX, SIGNING_PREFIX
from agent_contract.layout import USERS_FILE_KEY
from agent_operator.spec import EnterpriseAgent, KeySelector

ReferencedKind = Literal["Secret", "ConfigMap"]
# (kind, name) of a referenced object within the agent's namespace.
ObjectKey = tuple[str, str]
# What the controller read for each referenced object: the object, or None when there is none.
Found = Mapping[ObjectKey, Mapping[str, Any] | None]


@dataclass(frozen=True)
class Reference:
    """One field of the spec that names a Secret or ConfigMap in the agent's namespace.

    ``key`` is the key the pods read; None means the whole object (``envFrom``) or, when not
    ``in_revision``, only that the object must exist. ``name_field`` and ``key_field`` are the spec
    paths an error names (the key's path is the name's when the key is not a field of the spec)."""

    kind: ReferencedKind
    name: str
    name_field: str
    key: str | None = None
    key_field: str | None = None
    optional: bool = False  # a missing object or key is no error; it hashes as absent
    non_empty: bool = False  # the key must hold a value, not only be there
    in_revision: bool = True  # its content reaches the pods only when they start

    @property
    def object_key(self) -> ObjectKey:
        return (self.kind, self.name)


def referenced_objects(agent: EnterpriseAgent) -> list[Reference]:
    """Every Secret and ConfigMap the pods need that the operator does not own, in spec order."""
    spec = agent.spec
    refs = [
        Reference("Secret", ref.name, f"spec.imagePullSecrets[{i}].name", in_revision=False)
        for i, ref in enumerate(spec.image_pull_secrets)
    ]
    for i, var in enumerate(spec.env):
        source = var.value_from
        if source is None:
            continue
        sources: tuple[tuple[ReferencedKind, KeySelector | None, str], ...] = (
            ("Secret", source.secret_key_ref, "secretKeyRef"),
            ("ConfigMap", source.config_map_key_ref, "configMapKeyRef"),
        )
        for kind, selector, field in sources:
            if selector is not None:
                path = f"spec.env[{i}].valueFrom.{field}"
                refs.append(
                    Reference(
                        kind,
                        selector.name,
                        f"{path}.name",
                        selector.key,
                        f"{path}.key",
                        optional=bool(selector.optional),
                    )
                )
    for i, imported in enumerate(spec.env_from):
        if imported.secret_ref is not None:
            refs.append(Reference("Secret", imported.secret_ref.name, f"spec.envFrom[{i}].secretRef.name"))
        if imported.config_map_ref is not None:
            refs.append(Reference("ConfigMap", imported.config_map_ref.name, f"spec.envFrom[{i}].configMapRef.name"))
    if spec.security.users_secret_ref is not None:
        # Mounted with only this key (an empty file is a valid list of no users).
        refs.append(
            Reference(
                "Secret",
                spec.security.users_secret_ref.name,
                "spec.security.usersSecretRef.name",
                USERS_FILE_KEY,
                in_revision=False,
            )
        )
    if spec.state.postgres is not None:
        ref = spec.state.postgres.secret_ref
        path = "spec.state.postgres.secretRef"
        refs.append(Reference("Secret", ref.name, f"{path}.name", ref.key, f"{path}.key", non_empty=True))
    model = spec.model
    if model is not None and model.api_key_secret_ref is not None:
        key_ref = model.api_key_secret_ref
        path = "spec.model.apiKeySecretRef"
        refs.append(Reference("Secret", key_ref.name, f"{path}.name", key_ref.key, f"{path}.key", non_empty=True))
    if model is not None and model.ca_bundle is not None:
        bundle = model.ca_bundle
        refs.append(
            Reference(
                "ConfigMap",
                bundle.config_map_ref.name,
                "spec.model.caBundle.configMapRef.name",
                bundle.key,
                "spec.model.caBundle.key",
                non_empty=True,
            )
        )
    return refs


@dataclass(frozen=True)
class MissingReference:
    """A reference the objects read do not satisfy: the field to name and why (never a value)."""

    path: str
    message: str


def _value(obj: Mapping[str, Any], key: str) -> str | None:
    """The key's value as the API returns it (base64 for a Secret and a ConfigMap's binaryData)."""
    for section in ("data", "binaryData"):
        value = (obj.get(section) or {}).get(key)
        if value is not None:
            return str(value)
    return None


def unsatisfied(agent: EnterpriseAgent, found: Found) -> list[MissingReference]:
    """The references the objects ``found`` do not satisfy: an object that does not exist, a key
    that is not in it, or (where a value is needed) a key without a value. Optional ones never."""
    problems = []
    for ref in referenced_objects(agent):
        if ref.optional:
            continue
        obj = found.get(ref.object_key)
        if obj is None:
            problems.append(
                MissingReference(ref.name_field, f"{ref.kind} {ref.name!r} not found in namespace {agent.namespace!r}")
            )
            continue
        if ref.key is None:
            continue
        value = _value(obj, ref.key)
        if value is None or (ref.non_empty and not value):
            what = "no (or an empty) key" if ref.non_empty else "no key"
            problems.append(
                MissingReference(ref.key_field or ref.name_field, f"{ref.kind} {ref.name!r} has {what} {ref.key!r}")
            )
    return problems


def _content(ref: Reference, obj: Mapping[str, Any] | None) -> Any:
    """What of ``obj`` reaches the pods through ``ref``: one key's value, or all of its data."""
    if obj is None:
        return None
    if ref.key is not None:
        return _value(obj, ref.key)
    return {section: dict(obj.get(section) or {}) for section in ("data", "binaryData")}


def _digest_key(key_data: Mapping[str, str]) -> bytes:
    """The HMAC key: the agent's own signing and encryption keys, which only those who may read the
    agent's Secrets know. With a plain hash, the revision label of an agent whose only unknown is a
    short referenced secret (a PIN, a weak password) would let anyone who can read the agent try
    every candidate offline. These keys change only with a rotation, which changes the revision
    anyway (the key versions are part of it)."""
    material = sorted(
        (name, value) for name, value in key_data.items() if name.startswith((SIGNING_PREFIX, ENCRYPTION_PREFIX))
    )
    return hashlib.sha256(json.dumps(material, separators=(",", ":")).encode()).digest()


def content_digest(
    agent: EnterpriseAgent, found: Found, key_data: Mapping[str, str], refs: Sequence[Reference] | None = None
) -> str | None:
    """One keyed digest of everything the referenced objects give the pods, each entry with its
    kind, namespace, name and key; None when the spec references nothing that is part of the
    revision, so such an agent's revision is what it was before content was hashed. Never stored
    on its own: only the revision (a hash over it, the spec and the key versions) is shown."""
    entries = {
        json.dumps(
            [ref.kind, agent.namespace, ref.name, ref.key, _content(ref, found.get(ref.object_key))],
            sort_keys=True,
            separators=(",", ":"),
        )
        for ref in (refs if refs is not None else referenced_objects(agent))
        if ref.in_revision
    }
    if not entries:
        return None
    canonical = "\n".join(sorted(entries)).encode()
    return hmac.new(_digest_key(key_data), canonical, hashlib.sha256).hexdigest()

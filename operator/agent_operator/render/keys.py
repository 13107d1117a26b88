"""The key Secret's shape and the key versions it carries.

The keys themselves are generated in the cluster by the reconciler (never by a renderer, never in
Git). A Secret holds, one entry per key id, ``jwt-<kid>`` (token signing keys) and ``dek-<kid>``
(data-encryption keys), plus ``active.json`` naming the active id of each kind. Old ids stay so
tokens and data made with them can still be verified and decrypted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

from agent_contract.keyfiles import ACTIVE_KEYS_FILE, ENCRYPTION_PREFIX, SIGNING_PREFIX
from agent_operator.render.common import Manifest, key_secret_name, metadata
from agent_operator.spec import GROUP, EnterpriseAgent

ANNOTATION_ROTATED_FOR = f"{GROUP}/rotated-for"


@dataclass(frozen=True)
class KeyVersions:
    """Key ids present in the Secret, and which of them are active."""

    signing: tuple[str, ...] = ()
    encryption: tuple[str, ...] = ()
    active_signing: str | None = None
    active_encryption: str | None = None

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> KeyVersions:
        """Reads the ids from a Secret's ``data`` (values base64, as the API returns them)."""
        active: dict[str, str] = {}
        if ACTIVE_KEYS_FILE in data:
            try:
                active = json.loads(base64.b64decode(data[ACTIVE_KEYS_FILE]))
            except (ValueError, TypeError):
                active = {}
        return cls(
            signing=tuple(sorted(k.removeprefix(SIGNING_PREFIX) for k in data if k.startswith(SIGNING_PREFIX))),
            encryption=tuple(
                sorted(k.removeprefix(ENCRYPTION_PREFIX) for k in data if k.startswith(ENCRYPTION_PREFIX))
            ),
            active_signing=active.get("jwt"),
            active_encryption=active.get("dek"),
        )

    def fingerprint(self) -> dict[str, object]:
        """What a rollout depends on: which keys exist and which are active (never key material).

        Audit keys are left out on purpose: every rotation changes the signing and encryption ids
        too, and an operator upgrade that knew a new kind of key must not change the revision of
        every existing agent (their Secrets, made before audit keys, get one at their next rotation)."""
        return {
            "signing": list(self.signing),
            "encryption": list(self.encryption),
            "active": [self.active_signing, self.active_encryption],
        }


def build_key_secret(
    agent: EnterpriseAgent, data: Mapping[str, str] | None = None, rotated_for: str | None = None
) -> Manifest:
    """The key Secret; ``data`` (base64 values) is supplied by the reconciler, never rendered offline.
    ``rotated_for`` records the last rotate-keys request served, in the same write as the new keys."""
    secret: Manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(agent, key_secret_name(agent)),
        "type": "Opaque",
    }
    if rotated_for:
        secret["metadata"]["annotations"] = {ANNOTATION_ROTATED_FOR: rotated_for}
    if data:
        secret["data"] = dict(data)
    return secret

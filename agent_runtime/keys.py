"""Key material: JWT signing keys and data-encryption keys, each with a key id (kid).

The operator generates them in the cluster (into the key Secret) and ``agent-runtime init``
generates them into a local directory; both use these functions and the same file layout:
``jwt-<kid>`` (a PEM private key, or a base64 secret for HS256), ``dek-<kid>`` (a 32-byte key,
URL-safe base64, as Fernet and AES-GCM use) and ``active.json`` naming the active id of each kind.
"""

from __future__ import annotations

import base64
import json
import secrets
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from agent_runtime.config import ACTIVE_KEYS_FILE, SigningAlgorithm

SIGNING_PREFIX = "jwt-"
ENCRYPTION_PREFIX = "dek-"


def new_key_id() -> str:
    """A sortable, unique key id: creation time plus randomness (no secret in it)."""
    return f"{int(time.time()):x}{secrets.token_hex(4)}"


def generate_signing_key(algorithm: SigningAlgorithm) -> bytes:
    if algorithm is SigningAlgorithm.HS256:
        return base64.urlsafe_b64encode(secrets.token_bytes(64))
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm is SigningAlgorithm.EDDSA:
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_encryption_key() -> bytes:
    return base64.urlsafe_b64encode(secrets.token_bytes(32))


def new_key_files(algorithm: SigningAlgorithm, previous: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Key files with a fresh signing key and data-encryption key made active. Files in
    ``previous`` are kept, so older tokens still verify and older data still decrypts."""
    files = dict(previous or {})
    signing_id, encryption_id = new_key_id(), new_key_id()
    files[f"{SIGNING_PREFIX}{signing_id}"] = generate_signing_key(algorithm)
    files[f"{ENCRYPTION_PREFIX}{encryption_id}"] = generate_encryption_key()
    files[ACTIVE_KEYS_FILE] = json.dumps(
        {"jwt": signing_id, "dek": encryption_id, "algorithm": algorithm.value}
    ).encode()
    return files

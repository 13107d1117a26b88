"""The key-file format: JWT signing keys, data-encryption keys and audit keys, each with a key id (kid).

The operator generates them in the cluster (into the key Secret) and ``agent-runtime init``
generates them into a local directory; both use these functions and the same file layout:
``jwt-<kid>`` (a PEM private key, or a base64 secret for HS256), ``dek-<kid>`` (a 32-byte key,
URL-safe base64, as Fernet and AES-GCM use), ``audit-<kid>`` (an Ed25519 PEM private key that signs
the audit trail's checkpoints, whatever the token algorithm, so an auditor can hold its public half
only) and ``active.json`` naming the active id of each kind (``jwt``, ``dek``, ``audit``). A
directory made before audit keys existed has no ``audit-`` file and no ``audit`` id: it still loads.
"""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from agent_contract.config import SigningAlgorithm
from agent_contract.layout import regular_files

SIGNING_PREFIX = "jwt-"
ENCRYPTION_PREFIX = "dek-"
AUDIT_PREFIX = "audit-"
# The file in the key directory that names the active key id of each kind.
ACTIVE_KEYS_FILE = "active.json"


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
    """Key files with a fresh signing key, data-encryption key and audit key made active. Files in
    ``previous`` are kept, so older tokens still verify, older data still decrypts and older audit
    checkpoints still verify."""
    files = dict(previous or {})
    signing_id, encryption_id, audit_id = new_key_id(), new_key_id(), new_key_id()
    files[f"{SIGNING_PREFIX}{signing_id}"] = generate_signing_key(algorithm)
    files[f"{ENCRYPTION_PREFIX}{encryption_id}"] = generate_encryption_key()
    files[f"{AUDIT_PREFIX}{audit_id}"] = generate_signing_key(SigningAlgorithm.EDDSA)
    files[ACTIVE_KEYS_FILE] = json.dumps(
        {"jwt": signing_id, "dek": encryption_id, "audit": audit_id, "algorithm": algorithm.value}
    ).encode()
    return files


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: SigningAlgorithm
    private: Any  # Ed25519PrivateKey | RSAPrivateKey | bytes (HS256 secret)

    @functools.cached_property
    def verifier(self) -> Any:
        """What verifies this key's signatures: the public key, or the secret for HS256."""
        return self.private if isinstance(self.private, bytes) else self.private.public_key()


@dataclass(frozen=True)
class KeyRing:
    """Every key of the key directory; the active ones sign and encrypt, all of them verify and
    decrypt, so rotated keys keep working for what they made."""

    signing: dict[str, SigningKey]
    encryption: dict[str, bytes]
    active_signing: str
    active_encryption: str
    audit: dict[str, ed25519.Ed25519PrivateKey] = field(default_factory=dict)
    active_audit: str | None = None  # None: a directory from before audit keys

    @property
    def signer(self) -> SigningKey:
        return self.signing[self.active_signing]

    @property
    def audit_signer(self) -> tuple[str, ed25519.Ed25519PrivateKey] | None:
        """The active audit key and its id, or None when the directory has none."""
        return None if self.active_audit is None else (self.active_audit, self.audit[self.active_audit])

    @property
    def audit_public_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        """Every audit key's public half by id: what an auditor needs, and all that it needs."""
        return {kid: private.public_key() for kid, private in self.audit.items()}

    def audit_jwks(self) -> dict[str, Any]:
        """The audit public keys as a JWK set (RFC 8037 OKP keys)."""
        return {"keys": [public_jwk(kid, public) for kid, public in self.audit_public_keys.items()]}

    @classmethod
    def load(cls, directory: str | Path) -> KeyRing:
        return cls.from_files(regular_files(directory), str(directory))

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], where: str) -> KeyRing:
        """The ring from the key directory's files by name (also the key Secret's data, decoded)."""
        try:
            active = json.loads(files[ACTIVE_KEYS_FILE])
        except (KeyError, ValueError) as error:
            raise KeyError(f"{where}/{ACTIVE_KEYS_FILE}: cannot read the active key ids: {error}") from None
        signing: dict[str, SigningKey] = {}
        encryption: dict[str, bytes] = {}
        audit: dict[str, ed25519.Ed25519PrivateKey] = {}
        for name, content in sorted(files.items()):
            if name.startswith(SIGNING_PREFIX):
                kid = name.removeprefix(SIGNING_PREFIX)
                signing[kid] = _signing_key(kid, content)
            elif name.startswith(ENCRYPTION_PREFIX):
                kid = name.removeprefix(ENCRYPTION_PREFIX)
                encryption[kid] = base64.urlsafe_b64decode(content.strip())
            elif name.startswith(AUDIT_PREFIX):
                kid = name.removeprefix(AUDIT_PREFIX)
                audit[kid] = _audit_key(kid, content)
        active_audit = active.get("audit")
        ring = cls(
            signing,
            encryption,
            str(active.get("jwt")),
            str(active.get("dek")),
            audit,
            None if active_audit is None else str(active_audit),
        )
        if ring.active_signing not in signing or ring.active_encryption not in encryption:
            raise KeyError(f"{where}: active.json names keys that are not in the directory")
        if ring.active_audit is not None and ring.active_audit not in audit:
            raise KeyError(f"{where}: active.json names an audit key that is not in the directory")
        return ring


def _signing_key(kid: str, data: bytes) -> SigningKey:
    if data.lstrip().startswith(b"-----BEGIN"):
        private = serialization.load_pem_private_key(data, password=None)
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return SigningKey(kid, SigningAlgorithm.EDDSA, private)
        if isinstance(private, rsa.RSAPrivateKey):
            return SigningKey(kid, SigningAlgorithm.RS256, private)
        raise KeyError(f"signing key {kid}: unsupported key type {type(private).__name__}")
    return SigningKey(kid, SigningAlgorithm.HS256, base64.urlsafe_b64decode(data.strip()))


def _audit_key(kid: str, data: bytes) -> ed25519.Ed25519PrivateKey:
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyError(f"audit key {kid}: not a PEM private key: {error}") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KeyError(f"audit key {kid}: an Ed25519 key is required, not {type(private).__name__}")
    return private


def public_jwk(kid: str, public: ed25519.Ed25519PublicKey) -> dict[str, str]:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}


def write_key_files(directory: str | Path, files: dict[str, bytes]) -> None:
    """Writes key files readable by the owner only."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = path / name
        target.write_bytes(content)
        target.chmod(0o600)

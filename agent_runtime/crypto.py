"""Encryption of sensitive fields: AES-256-GCM with key ids and associated data.

A sealed value is ``v1.<kid>.<nonce>.<ciphertext>`` (URL-safe base64, no padding). The key id
lets any key of the ring decrypt what it sealed after a rotation; the associated data binds a
value to its context (a subject, a field name), so a ciphertext moved elsewhere fails to open.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent_contract.keyfiles import KeyRing

PREFIX = "v1"


class DecryptionError(ValueError):
    """The value was tampered with, sealed for other associated data, or by an unknown key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FieldEncryptor:
    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> str:
        kid = self._keys.active_encryption
        nonce = os.urandom(12)
        ciphertext = AESGCM(self._keys.encryption[kid]).encrypt(nonce, plaintext, associated_data)
        return f"{PREFIX}.{kid}.{_b64(nonce)}.{_b64(ciphertext)}"

    def open(self, sealed: str, associated_data: bytes = b"") -> bytes:
        try:
            version, kid, nonce, ciphertext = sealed.split(".")
        except ValueError:
            raise DecryptionError("not a sealed value") from None
        if version != PREFIX:
            raise DecryptionError(f"unknown format {version!r}")
        key = self._keys.encryption.get(kid)
        if key is None:
            raise DecryptionError(f"unknown key id {kid!r}")
        try:
            return AESGCM(key).decrypt(_unb64(nonce), _unb64(ciphertext), associated_data)
        except (InvalidTag, ValueError):
            raise DecryptionError("authentication failed") from None

    def reseal(self, sealed: str, associated_data: bytes = b"") -> str:
        """Re-encrypts with the active key (after a rotation)."""
        return self.seal(self.open(sealed, associated_data), associated_data)

    @staticmethod
    def key_id(sealed: str) -> str:
        return sealed.split(".")[1]

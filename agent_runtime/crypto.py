"""Encryption of sensitive fields: AES-256-GCM with key ids and associated data.

A sealed value is ``v1.<kid>.<nonce>.<ciphertext>`` (URL-safe base64, no padding). The key id
lets any key of the ring decrypt what it sealed after a rotation; the associated data binds a
value to its context (a subject, a field name), so a ciphertext moved elsewhere fails to open.

Pseudonyms of data subjects are HMAC-SHA256 under a key derived (HKDF) from the active
data-encryption key: stable across restarts, useless to anyone holding a list of candidate names
but not the key. Rotating the data-encryption key changes the pseudonyms given from then on.
"""

from __future__ import annotations

import base64
import functools
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


# HKDF's info: the derived key is for pseudonyms only, independent of the AES-GCM use of the DEK.
_PSEUDONYM_INFO = b"agent-runtime/pseudonym/v1"


@functools.lru_cache(maxsize=8)
def _pseudonym_key(data_encryption_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PSEUDONYM_INFO).derive(data_encryption_key)


def pseudonym(keys: KeyRing, subject: str) -> str:
    """A data subject's keyed pseudonym (128 bits, hex), under the active data-encryption key."""
    mac = hmac.HMAC(_pseudonym_key(keys.encryption[keys.active_encryption]), hashes.SHA256())
    mac.update(subject.encode())
    return mac.finalize()[:16].hex()

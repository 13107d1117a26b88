"""Field encryption: a rotation round trip, associated data, tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import KeyRing, new_key_files, write_key_files
from agent_runtime.crypto import DecryptionError, FieldEncryptor


def test_rotation_round_trip(tmp_path: Path) -> None:
    write_key_files(tmp_path / "v1", new_key_files(SigningAlgorithm.EDDSA))
    before = KeyRing.load(tmp_path / "v1")
    sealed = FieldEncryptor(before).seal(b"patient: Jane Doe, MRN 1234", b"subject:42|field:notes")

    previous = {path.name: path.read_bytes() for path in (tmp_path / "v1").iterdir()}
    write_key_files(tmp_path / "v2", new_key_files(SigningAlgorithm.EDDSA, previous))
    after = FieldEncryptor(KeyRing.load(tmp_path / "v2"))
    assert after.open(sealed, b"subject:42|field:notes") == b"patient: Jane Doe, MRN 1234"  # old data still opens
    resealed = after.reseal(sealed, b"subject:42|field:notes")
    assert FieldEncryptor.key_id(resealed) != FieldEncryptor.key_id(sealed)  # now under the new key
    assert after.open(resealed, b"subject:42|field:notes") == b"patient: Jane Doe, MRN 1234"
    with pytest.raises(DecryptionError, match="unknown key id"):
        FieldEncryptor(before).open(resealed, b"subject:42|field:notes")  # the old ring lacks the new key


def test_associated_data_and_tampering(tmp_path: Path) -> None:
    write_key_files(tmp_path / "k", new_key_files(SigningAlgorithm.EDDSA))
    encryptor = FieldEncryptor(KeyRing.load(tmp_path / "k"))
    sealed = encryptor.seal(b"secret", b"subject:1")
    assert encryptor.seal(b"secret", b"subject:1") != sealed  # a fresh nonce every time
    with pytest.raises(DecryptionError, match="authentication failed"):
        encryptor.open(sealed, b"subject:2")  # moved to another subject
    version, kid, nonce, body = sealed.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(DecryptionError):
        encryptor.open(".".join([version, kid, nonce, flipped]), b"subject:1")
    for garbage in ("", "v1.only.three", "v9.a.b.c", "v1.k.!!.??"):
        with pytest.raises(DecryptionError):
            encryptor.open(garbage, b"subject:1")

"""The contract shared by operator and runtime: mounted volumes, the operation table, tokens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pytest_aiohttp.plugin import AiohttpClient

from agent_contract.config import RuntimeConfig, SigningAlgorithm
from agent_contract.keyfiles import KeyRing, new_key_files
from agent_contract.layout import regular_files
from agent_contract.operations import BUILTIN_OPERATIONS
from agent_contract.tokens import ACCESS_TYPE, SMOKE_SUBJECT, mint_smoke_token
from agent_runtime.app import create_app
from agent_runtime.operations import BUILTINS
from agent_runtime.security.tokens import LocalTokens
from agent_runtime.settings import Settings


def secret_volume(directory: Path, files: dict[str, bytes]) -> Path:
    """The layout the kubelet writes for a Secret volume: a timestamped directory holding the
    data, ``..data`` pointing at it, and one symlink per key through ``..data``."""
    stamped = directory / "..2026_12_01_14_27_19.1234567"
    stamped.mkdir(parents=True)
    for name, content in files.items():
        (stamped / name).write_bytes(content)
        os.symlink(f"..data/{name}", directory / name)
    os.symlink(stamped.name, directory / "..data")
    return directory


def test_a_secret_volume_reads_as_its_keys_only(tmp_path: Path) -> None:
    files = new_key_files(SigningAlgorithm.EDDSA)
    volume = secret_volume(tmp_path / "keys", files)
    (volume / "subdir").mkdir()  # a directory is never a key
    assert regular_files(volume) == files
    ring = KeyRing.load(volume)
    assert ring.active_signing in ring.signing


def test_a_dangling_key_link_is_skipped(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "keys", {"users": b"alice:x\n"})
    os.symlink("..data/gone", volume / "gone")
    assert regular_files(volume) == {"users": b"alice:x\n"}


async def test_every_declared_operation_is_served(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    """The runtime serves exactly the operations the operator accepts, when all are enabled."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, content in new_key_files(SigningAlgorithm.EDDSA).items():
        (keys / name).write_bytes(content)
    config = RuntimeConfig.model_validate(
        {
            "agentName": "contract",
            "operations": list(BUILTIN_OPERATIONS),
            "dataDir": str(tmp_path / "data"),
            "auth": {"keysDir": str(keys)},
            "model": {"baseUrl": "http://127.0.0.1:9/v1", "model": "test-model"},
            "egress": {"allowedHosts": ["127.0.0.1"]},
        }
    )
    client = await aiohttp_client(create_app(Settings(config=config), BUILTINS))
    document = await (await client.get("/openapi.json")).json()
    served = {path.removeprefix("/v1/operations/") for path in document["paths"] if path.startswith("/v1/operations/")}
    assert served == set(BUILTIN_OPERATIONS)


@pytest.mark.parametrize("algorithm", list(SigningAlgorithm))
def test_the_smoke_token_is_one_the_runtime_accepts(algorithm: SigningAlgorithm) -> None:
    files = new_key_files(algorithm)
    config = RuntimeConfig(agent_name="contract")
    token = mint_smoke_token(config, files)
    claims = LocalTokens(config.auth, KeyRing.from_files(files, "test")).verify(token, ACCESS_TYPE)
    assert claims.subject == SMOKE_SUBJECT
    assert set(claims.roles) == set(config.roles)


def test_a_key_secret_without_active_ids_cannot_sign() -> None:
    files = new_key_files(SigningAlgorithm.EDDSA)
    del files["active.json"]
    with pytest.raises(KeyError, match="active key ids"):
        mint_smoke_token(RuntimeConfig(agent_name="contract"), files)

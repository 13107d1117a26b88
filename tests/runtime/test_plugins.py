"""Plugin operations from entry points (group agent_runtime.operations), as an installed package
would declare them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_runtime.app import create_app
from agent_runtime.operations import discover_plugins
from agent_runtime.settings import Settings
from agent_runtime.state import REGISTRY
from tests.runtime.conftest import login, make_layout

PLUGIN = """
from agent_runtime.operations import Operation, Permission, SecurityLevel


async def _shout(payload):
    return {"text": str(payload.get("text", "")).upper()}


def shout():
    return Operation("shout", Permission.EXECUTE, SecurityLevel.PUBLIC, _shout, "Upper-cases text.")


def bad():
    return "not an operation"
"""


def _install(site: Path, entry_points: str) -> None:
    (site / "eao_test_plugin.py").write_text(PLUGIN)
    info = site / "eao_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eao-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[agent_runtime.operations]\n{entry_points}\n")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "site"
    directory.mkdir()
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop("eao_test_plugin", None)


async def test_a_plugin_operation_is_served(site: Path, aiohttp_client: Any, tmp_path: Path) -> None:
    _install(site, "shout = eao_test_plugin:shout")
    assert set(discover_plugins()) == {"shout"}
    config = make_layout(tmp_path / "agent", operations=["shout"])
    client = await aiohttp_client(create_app(Settings.load(str(config))))
    assert "shout" in client.app[REGISTRY].operations
    token = (await login(client, "otto"))["access_token"]
    response = await client.post(
        "/v1/operations/shout", json={"input": {"text": "hi"}}, headers={"Authorization": f"Bearer {token}"}
    )
    assert (await response.json())["result"] == {"text": "HI"}


def test_a_broken_plugin_is_named(site: Path) -> None:
    _install(site, "bad = eao_test_plugin:bad")
    with pytest.raises(TypeError, match="plugin 'bad'"):
        discover_plugins()

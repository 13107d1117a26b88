"""Fixtures shared by the packaging tests and the cluster tests that run our programs as the images do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fake_model import FakeModel
from tests.packaging.sandbox import build_image_venv


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv built like the image's /opt/venv (not editable): what setuptools really packages."""
    venv_bin = build_image_venv(tmp_path_factory.mktemp("image") / "venv")
    assert not (venv_bin / "pip").exists()  # no installer in the image
    return venv_bin


@pytest.fixture
async def fake_model() -> AsyncIterator[FakeModel]:
    """A fake OpenAI-compatible endpoint on loopback (tests/fake_model.py), plain HTTP."""
    async with FakeModel() as fake:
        yield fake

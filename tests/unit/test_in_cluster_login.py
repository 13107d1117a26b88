"""kopf's in-cluster credentials come from the same place as client-go's (the chart-install e2e
test runs the operator this way; these cover the corners it does not)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_operator import kube


@pytest.fixture
def account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "token").write_text("a-token\n")
    (tmp_path / "namespace").write_text("eao-system")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path)
    return tmp_path


def test_the_api_server_comes_from_the_service_env(account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    info = kube.in_cluster_connection()
    assert info is not None
    assert (info.server, info.token, info.scheme) == ("https://10.96.0.1:6443", "a-token", "Bearer")
    assert info.ca_path == str(account / "ca.crt")
    assert info.default_namespace == "eao-system"


def test_an_ipv6_service_address_is_bracketed(account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    info = kube.in_cluster_connection()
    assert info is not None
    assert info.server == "https://[fd00::1]:443"


def test_outside_a_pod_there_is_no_in_cluster_login(account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kube.in_cluster_connection() is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (account / "token").unlink()
    assert kube.in_cluster_connection() is None

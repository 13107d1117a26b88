"""The operator's kubeconfig reader, on kubeconfig files as kubectl takes them: relative paths,
several files, token files, credential plugins (run for real, as scripts) and the errors of each."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_operator import kubeconfig
from agent_operator.kubeconfig import KubeconfigError, connection, forget_plugin_credentials

V1 = "client.authentication.k8s.io/v1"
PLUGIN = """#!{python}
import json, os, pathlib, sys
here = pathlib.Path(__file__).parent
with open(here / "runs", "a") as runs:
    runs.write(os.environ.get("KUBERNETES_EXEC_INFO", "") + "\\n")
if os.environ.get("PLUGIN_FAILS"):
    print("token expired: run `cloud login`", file=sys.stderr)
    sys.exit(7)
status = {{"token": (here / "token").read_text().strip()}}
if os.environ.get("PLUGIN_EXPIRES"):
    status["expirationTimestamp"] = os.environ["PLUGIN_EXPIRES"]
print(json.dumps({{"apiVersion": os.environ.get("PLUGIN_ANSWERS", "{v1}"), "kind": "ExecCredential", "status": status}}))
"""


@pytest.fixture(autouse=True)
def _no_plugin_credentials_kept() -> None:
    forget_plugin_credentials()


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def _config(user: dict[str, Any], cluster: dict[str, Any] | None = None, current: str = "work") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": current,
        "contexts": [{"name": "work", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://api.example:6443"}}],
        "users": [{"name": "u", "user": user}],
    }


def _plugin(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "credential-plugin"
    script.write_text(PLUGIN.format(python=sys.executable, v1=V1))
    script.chmod(0o755)
    (directory / "token").write_text("plugin-token")
    return script


def _runs(directory: Path) -> list[str]:
    runs = directory / "runs"
    return runs.read_text().splitlines() if runs.exists() else []


def test_relative_paths_are_relative_to_the_file_that_names_them(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    (home / "pki").mkdir(parents=True)
    (home / "token").write_text("file-token\n")
    path = _write(
        home / "config",
        _config(
            {"tokenFile": "token", "client-certificate": "pki/me.crt", "client-key": "pki/me.key"},
            {"server": "https://api.example:6443", "certificate-authority": "pki/ca.crt"},
        ),
    )
    info = connection([path])
    assert info is not None
    assert info.token == "file-token"
    assert info.scheme == "Bearer"
    assert (info.ca_path, info.certificate_path, info.private_key_path) == (
        str(home / "pki" / "ca.crt"),
        str(home / "pki" / "me.crt"),
        str(home / "pki" / "me.key"),
    )
    assert info.default_namespace == "team"


def test_several_files_merge_as_kubectl_merges_them(tmp_path: Path) -> None:
    first = _write(
        tmp_path / "a",
        {"current-context": "work", "users": [{"name": "u", "user": {"token": "first"}}]},
    )
    second = _write(tmp_path / "b", _config({"token": "second"}, current="other"))
    info = connection([first, tmp_path / "missing", second])  # a listed file that is not there is skipped
    assert info is not None
    assert (info.server, info.token) == ("https://api.example:6443", "first")


def test_data_wins_over_a_path_to_the_same_thing(tmp_path: Path) -> None:
    cluster = {
        "server": "https://api.example:6443",
        "certificate-authority": "ca.crt",
        "certificate-authority-data": "Q0E=",
    }
    info = connection([_write(tmp_path / "config", _config({"token": "t"}, cluster))])
    assert info is not None
    assert (info.ca_path, info.ca_data) == (None, "Q0E=")


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"clusters": []}, "current-context is not set"),
        (_config({"token": "t"}, current="gone"), "contexts[gone] is not defined"),
        (_config({"token": "t"}, {"insecure-skip-tls-verify": True}), "clusters[c].server: required"),
        (_config({"tokenFile": "no-such-file"}), "users[u].tokenFile: cannot read"),
        (_config({"exec": {"apiVersion": "v1", "command": "x"}}), "users[u].exec.apiVersion: 'v1' is not one of"),
        (_config({"exec": {"apiVersion": V1}}), "users[u].exec.command: required"),
        (
            _config({"exec": {"apiVersion": V1, "command": "no-such-plugin-here", "installHint": "install it"}}),
            "users[u].exec.command: 'no-such-plugin-here' was not found (install it)",
        ),
        (
            _config({"exec": {"apiVersion": V1, "command": "sh", "interactiveMode": "Always"}}),
            "users[u].exec.interactiveMode: Always needs a terminal",
        ),
        (_config({"exec": {"apiVersion": V1, "command": "sh", "env": [{"name": "A"}]}}), "users[u].exec.env[0]"),
        (_config({"exec": {"apiVersion": V1, "command": "echo", "args": ["not json"]}}), "output is not JSON"),
    ],
    ids=[
        "no-context",
        "unknown-context",
        "no-server",
        "token-file",
        "api-version",
        "command",
        "not-found",
        "interactive",
        "env",
        "not-json",
    ],
)
def test_a_kubeconfig_that_cannot_be_used_names_the_file_and_the_field(
    tmp_path: Path, document: dict[str, Any], named: str
) -> None:
    path = _write(tmp_path / "config", document)
    with pytest.raises(KubeconfigError, match="^" + str(path).replace(".", r"\.")) as refused:
        connection([path])
    assert named in str(refused.value)


def test_a_credential_plugin_runs_without_a_terminal_and_is_told_of_the_cluster(tmp_path: Path) -> None:
    _plugin(tmp_path / "plugins")
    exec_spec = {
        "apiVersion": V1,
        "command": "./plugins/credential-plugin",  # a slash: relative to the kubeconfig
        "env": [{"name": "PLUGIN_EXPIRES", "value": "2099-01-01T00:00:00Z"}],
        "provideClusterInfo": True,
        "interactiveMode": "Never",
    }
    cluster = {
        "server": "https://api.example:6443",
        "certificate-authority-data": "Q0E=",
        "extensions": [{"name": "client.authentication.k8s.io/exec", "extension": {"audience": "eao"}}],
    }
    info = connection([_write(tmp_path / "config", _config({"exec": exec_spec}, cluster))])
    assert info is not None
    assert (info.scheme, info.token) == ("Bearer", "plugin-token")
    assert info.expiration == datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC)
    (told,) = _runs(tmp_path / "plugins")
    assert json.loads(told) == {
        "apiVersion": V1,
        "kind": "ExecCredential",
        "spec": {
            "interactive": False,
            "cluster": {
                "server": "https://api.example:6443",
                "certificate-authority-data": "Q0E=",
                "config": {"audience": "eao"},
            },
        },
    }


def test_a_plugins_credential_is_kept_until_it_expires_or_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    _plugin(plugins)
    path = _write(
        tmp_path / "config", _config({"exec": {"apiVersion": V1, "command": str(plugins / "credential-plugin")}})
    )
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    monkeypatch.setenv("PLUGIN_EXPIRES", later.isoformat().replace("+00:00", "Z"))
    assert [connection([path]).token for _ in range(3)] == ["plugin-token"] * 3  # type: ignore[union-attr]
    assert len(_runs(plugins)) == 1  # kept: not run for every login
    (plugins / "token").write_text("new-token")
    forget_plugin_credentials()  # what a 401 does
    assert connection([path]).token == "new-token"  # type: ignore[union-attr]
    assert len(_runs(plugins)) == 2
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=kubeconfig.RENEW_BEFORE_SECONDS / 2)
    monkeypatch.setenv("PLUGIN_EXPIRES", soon.isoformat())
    forget_plugin_credentials()
    connection([path])
    connection([path])  # expires within the renewal margin: asked again
    assert len(_runs(plugins)) == 4


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({"PLUGIN_FAILS": "1"}, "exited with 7: token expired: run `cloud login`"),
        ({"PLUGIN_ANSWERS": "client.authentication.k8s.io/v1beta1"}, "answered 'client.authentication.k8s.io/v1beta1'"),
        ({"PLUGIN_EXPIRES": "next tuesday"}, "status.expirationTimestamp 'next tuesday' is not RFC 3339"),
    ],
    ids=["fails", "wrong-version", "bad-expiry"],
)
def test_a_plugin_that_fails_or_answers_wrongly_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], named: str
) -> None:
    plugins = tmp_path / "plugins"
    _plugin(plugins)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    path = _write(
        tmp_path / "config", _config({"exec": {"apiVersion": V1, "command": str(plugins / "credential-plugin")}})
    )
    with pytest.raises(KubeconfigError, match=r"users\[u\]\.exec") as refused:
        connection([path])
    assert named in str(refused.value)


def test_the_legacy_auth_providers_token_and_basic_credentials_are_read(tmp_path: Path) -> None:
    cached = {"auth-provider": {"name": "oidc", "config": {"access-token": "cached-token", "idp-issuer-url": "x"}}}
    info = connection([_write(tmp_path / "a", _config(cached))])
    assert info is not None
    assert info.as_http_headers() == {"Authorization": "Bearer cached-token"}
    basic = connection([_write(tmp_path / "b", _config({"username": "ada", "password": "s3cret"}))])
    assert basic is not None
    assert basic.as_http_headers()["Authorization"].startswith("Basic ")
    assert basic.token is None

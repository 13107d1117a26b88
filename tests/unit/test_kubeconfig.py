"""The operator's kubeconfig reader, on kubeconfig files as kubectl takes them: relative paths,
several files, token files, credential plugins (run for real, as scripts) and the errors of each."""

from __future__ import annotations

import datetime
import json
import os
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


def _exec(**fields: Any) -> dict[str, Any]:
    return _config({"exec": {"apiVersion": V1, **fields}})


@pytest.mark.parametrize(
    ("document", "named"),
    [
        pytest.param({"clusters": []}, "current-context is not set", id="no-context"),
        pytest.param(_config({"token": "t"}, current="gone"), "contexts[gone] is not defined", id="unknown-context"),
        pytest.param(
            _config({"token": "t"}, {"insecure-skip-tls-verify": True}), "clusters[c].server: required", id="no-server"
        ),
        pytest.param({"current-context": "w", "clusters": 5}, ": clusters: a list is expected", id="clusters-not-list"),
        pytest.param(
            _config({"token": "t"}, {"server": "https://a:1", "insecure-skip-tls-verify": "false"}),
            "clusters[c].insecure-skip-tls-verify: true or false is expected",
            id="insecure-as-string",
        ),
        pytest.param(_config({"tokenFile": "no-such-file"}), "users[u].tokenFile: cannot read", id="token-file"),
        pytest.param(
            _config({"token": "t"}, {"server": "https://a:1", "proxy-url": "socks5://proxy:1080"}),
            "clusters[c].proxy-url: an http:// or https:// proxy URL is expected (socks5 is not supported)",
            id="socks-proxy",
        ),
        pytest.param(
            _config({"token": "t"}, {"server": "https://a:1", "proxy-url": "proxy.corp:3128"}),
            "clusters[c].proxy-url: an http:// or https:// proxy URL is expected",
            id="proxy-without-scheme",
        ),
        pytest.param(
            _config({"auth-provider": {"name": "oidc", "config": "x"}}),
            "users[u].auth-provider: a mapping with a name and a config mapping is expected",
            id="auth-provider-config",
        ),
        pytest.param(
            _config({"exec": {"apiVersion": "v1", "command": "x"}}),
            "users[u].exec.apiVersion: 'v1' is not one of",
            id="api-version",
        ),
        pytest.param(_exec(), "users[u].exec.command: required", id="command"),
        pytest.param(
            _exec(command="no-such-plugin-here", installHint="install it"),
            "users[u].exec.command: 'no-such-plugin-here' was not found (install it)",
            id="not-found",
        ),
        pytest.param(
            _exec(command="no-such-plugin-here", installHint=5),
            "users[u].exec.command: 'no-such-plugin-here' was not found",
            id="hint-not-text",
        ),
        pytest.param(
            _exec(command="sh", interactiveMode="Always"),
            "users[u].exec.interactiveMode: Always needs a terminal",
            id="interactive",
        ),
        pytest.param(_exec(command="sh", env=[{"name": "A"}]), "users[u].exec.env[0].value", id="env-no-value"),
        pytest.param(_exec(command="sh", env=5), "users[u].exec.env: a list", id="env-not-list"),
        pytest.param(
            _exec(command="sh", env=[{"name": "A=B", "value": "c"}]), "users[u].exec.env[0].name", id="env-name-with-="
        ),
        pytest.param(_exec(command="echo", args=["a\0b"]), "users[u].exec.args", id="nul-in-args"),
        pytest.param(
            _exec(command="echo", args=["ya29.a-bare-token"]),
            "the plugin's output (18 bytes) is not JSON",
            id="not-json",
        ),
    ],
)
def test_a_kubeconfig_that_cannot_be_used_names_the_file_and_the_field(
    tmp_path: Path, document: dict[str, Any], named: str
) -> None:
    path = _write(tmp_path / "config", document)
    with pytest.raises(KubeconfigError, match="^" + str(path).replace(".", r"\.")) as refused:
        connection([path])
    assert named in str(refused.value)
    assert "ya29" not in str(refused.value)  # a plugin's output is never repeated: it may be a token


def test_a_plugin_entry_that_refers_to_itself_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        "current-context: w\n"
        "contexts: [{name: w, context: {cluster: c, user: u}}]\n"
        "clusters: [{name: c, cluster: {server: 'https://a:1', extensions: &loop [{name: client.authentication.k8s.io/exec, extension: *loop}]}}]\n"
        "users: [{name: u, user: {exec: {apiVersion: client.authentication.k8s.io/v1, command: echo, provideClusterInfo: true}}}]\n"
    )
    with pytest.raises(KubeconfigError, match=r"clusters\[c\]\.extensions: cannot be passed to a plugin as JSON"):
        connection([path])


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
    # client-go's oidc provider sends the id-token, its gcp and azure providers the access-token.
    both = {"id-token": "id-token", "access-token": "access-token", "idp-issuer-url": "x"}
    oidc = connection([_write(tmp_path / "a", _config({"auth-provider": {"name": "oidc", "config": both}}))])
    assert oidc is not None
    assert oidc.as_http_headers() == {"Authorization": "Bearer id-token"}
    gcp = connection([_write(tmp_path / "g", _config({"auth-provider": {"name": "gcp", "config": both}}))])
    assert gcp is not None
    assert gcp.as_http_headers() == {"Authorization": "Bearer access-token"}
    basic = connection([_write(tmp_path / "b", _config({"username": "ada", "password": "s3cret"}))])
    assert basic is not None
    assert basic.as_http_headers()["Authorization"].startswith("Basic ")
    assert basic.token is None


def test_a_token_file_wins_over_a_token_beside_it(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-the-file\n")
    info = connection([_write(tmp_path / "config", _config({"token": "written-in", "tokenFile": "token"}))])
    assert info is not None
    assert info.token == "from-the-file"


def test_only_the_refused_token_is_forgotten_and_one_expired_as_issued_is_kept_until_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    _plugin(plugins)
    monkeypatch.setenv("PLUGIN_EXPIRES", "2000-01-01T00:00:00Z")  # a clock skewed from the plugin's
    path = _write(
        tmp_path / "config", _config({"exec": {"apiVersion": V1, "command": str(plugins / "credential-plugin")}})
    )
    first = connection([path])
    assert first is not None
    assert first.expiration is None  # not handed to kopf as expired: it would log in on every request
    forget_plugin_credentials("some-older-token")  # a refusal of a token no longer in use
    connection([path])
    assert len(_runs(plugins)) == 1
    forget_plugin_credentials("plugin-token")  # the one in use refused
    connection([path])
    assert len(_runs(plugins)) == 2


PROXY = {"HTTPS_PROXY": "http://p:1"}


@pytest.mark.parametrize(
    ("server", "cluster_proxy", "environment", "proxy"),
    [
        pytest.param("https://api.example:6443", None, {}, None, id="none"),
        pytest.param("https://api.example:6443", None, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128", id="https"),
        pytest.param("https://api.example:6443", None, {"https_proxy": "p:3128"}, "http://p:3128", id="bare-host"),
        pytest.param("http://api.example:8080", None, {"HTTPS_PROXY": "http://p:1"}, None, id="http-server"),
        pytest.param("http://api.example:8080", None, {"HTTP_PROXY": "http://p:2"}, "http://p:2", id="http-proxy"),
        pytest.param(
            "https://api.example:6443", None, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example"}, None, id="no-proxy"
        ),
        pytest.param(
            "https://api.example:6443",
            None,
            {"HTTPS_PROXY": "http://p:1", "https_proxy": "http://q:1"},
            "http://p:1",
            id="upper-case-first",
        ),
        pytest.param(
            "https://api.example:6443",
            None,
            {"HTTPS_PROXY": "", "https_proxy": "http://q:1"},
            "http://q:1",
            id="empty-upper-case-skipped",
        ),
        pytest.param(
            "https://10.1.2.3:6443", None, {**PROXY, "no_proxy": "192.168.0.0/16, 10.0.0.0/8"}, None, id="cidr"
        ),
        pytest.param("https://10.1.2.3:6443", None, {**PROXY, "NO_PROXY": "10.1.2.3"}, None, id="address"),
        pytest.param(
            "https://10.1.2.3:6443",
            None,
            {**PROXY, "NO_PROXY": "10.1.2.4,11.0.0.0/8"},
            "http://p:1",
            id="other-addresses",
        ),
        pytest.param("https://[fd00::1]:6443", None, {**PROXY, "NO_PROXY": "[fd00::1]"}, None, id="ipv6-brackets"),
        pytest.param("https://[fd00::1]:6443", None, {**PROXY, "NO_PROXY": "fd00::/64"}, None, id="ipv6-cidr"),
        pytest.param("https://api.corp:6443", None, {**PROXY, "NO_PROXY": "api.corp:6443"}, None, id="host-port"),
        pytest.param(
            "https://api.corp:6443", None, {**PROXY, "NO_PROXY": "api.corp:443"}, "http://p:1", id="other-port"
        ),
        pytest.param("https://api.corp", None, {**PROXY, "NO_PROXY": "api.corp:443"}, None, id="default-port"),
        pytest.param("https://api.corp:6443", None, {**PROXY, "NO_PROXY": "example.org, *"}, None, id="star-in-a-list"),
        pytest.param("https://x.api.corp:6443", None, {**PROXY, "NO_PROXY": "*.api.corp"}, None, id="star-dot"),
        pytest.param("https://x.api.corp:6443", None, {**PROXY, "NO_PROXY": "api.corp"}, None, id="subdomain"),
        pytest.param(
            "https://api.corp:6443", None, {**PROXY, "NO_PROXY": ".api.corp"}, "http://p:1", id="dot-not-itself"
        ),
        pytest.param(
            "https://notapi.corp:6443", None, {**PROXY, "NO_PROXY": "api.corp"}, "http://p:1", id="not-a-suffix"
        ),
        pytest.param("https://127.0.0.1:6443", None, {"HTTPS_PROXY": "http://p:1"}, None, id="loopback-v4"),
        pytest.param("https://[::1]:6443", None, {"HTTPS_PROXY": "http://p:1"}, None, id="loopback-v6"),
        pytest.param("https://localhost:6443", None, {"HTTPS_PROXY": "http://p:1"}, None, id="localhost"),
        pytest.param(
            "https://api.example:6443", "http://c:3", {"HTTPS_PROXY": "http://p:1"}, "http://c:3", id="proxy-url-wins"
        ),
    ],
)
def test_the_proxy_is_the_proxy_url_or_else_the_environments_but_never_for_loopback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    cluster_proxy: str | None,
    environment: dict[str, str],
    proxy: str | None,
) -> None:
    """As client-go: the cluster's proxy-url, or else HTTPS_PROXY (HTTP_PROXY for an http API
    server) unless NO_PROXY names the host, and never a loopback API server's requests. The
    HTTP client is not asked to read the environment itself (it would, on every request)."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    cluster = {"server": server, **({"proxy-url": cluster_proxy} if cluster_proxy else {})}
    info = connection([_write(tmp_path / "config", _config({"token": "t"}, cluster))])
    assert info is not None
    assert (info.proxy_url, info.trust_env) == (proxy, False)


def test_a_socks_proxy_in_the_environment_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://p:1080")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(
        KubeconfigError, match=r"the HTTPS_PROXY environment variable: .*\(socks5 is not supported\); or name the API"
    ):
        connection([_write(tmp_path / "config", _config({"token": "t"}))])


@pytest.mark.parametrize("relative_entry", [".", "", "bin"])
def test_a_plugin_is_never_found_through_a_relative_path_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative_entry: str
) -> None:
    """A plugin named without a slash is looked up on PATH's absolute entries only: one in the
    working directory (PATH's ".", or an empty entry) is never run, as Go's exec.LookPath refuses it."""
    work = tmp_path / "work"
    _plugin(work).rename(work / "kube-login")
    (work / "bin").mkdir()
    (work / "bin" / "kube-login").symlink_to(work / "kube-login")
    (work / "token").write_text("from-the-working-directory")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", os.pathsep.join([relative_entry, "/usr/bin", "/bin"]))
    path = _write(tmp_path / "config", _exec(command="kube-login"))
    with pytest.raises(KubeconfigError, match=r"users\[u\]\.exec\.command: 'kube-login' was not found"):
        connection([path])
    assert not (work / "runs").exists()  # it never ran
    monkeypatch.setenv("PATH", os.pathsep.join([str(work), "/usr/bin", "/bin"]))  # the same, named absolutely
    info = connection([path])
    assert info is not None
    assert info.token == "from-the-working-directory"

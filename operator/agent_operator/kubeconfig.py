"""The kubeconfig as kubectl reads it, for an operator run outside a cluster (``make run`` against
the current context). kopf's own reader covers the simplest files only: it has no credential plugins
(``exec``: EKS, GKE, AKS, OIDC logins), no ``tokenFile``, and it reads relative paths from the working
directory instead of the file that names them. This one follows client-go's rules:

- KUBECONFIG lists files (``os.pathsep``); ~/.kube/config when it is unset. For contexts, clusters
  and users the first file to name one wins; current-context comes from the first file that sets it.
- A relative path (a CA, a client certificate or key, a token file, a plugin command with a slash in
  it) is relative to the directory of the file that names it.
- The proxy is the cluster's proxy-url, or else HTTPS_PROXY (HTTP_PROXY for an http server) unless
  NO_PROXY names the host; a loopback API server is never proxied. A plugin named without a slash
  is looked up on PATH's absolute entries only.
- A credential plugin is run without a terminal, its answer (an ExecCredential) kept until its
  expirationTimestamp, or until the API server refuses it (``forget_plugin_credentials``).

An error names the file and the field, as ``users[admin].exec.command``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import yaml

log = logging.getLogger(__name__)

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
PLUGIN_TIMEOUT_SECONDS = 60.0  # an EKS or GKE token takes a second or two; a hung plugin must not hang us
# A plugin's credential is used until this long before it expires (client-go renews at expiry).
RENEW_BEFORE_SECONDS = 60.0
_MESSAGE_BYTES = 500


class KubeconfigError(kopf.LoginError):
    """The kubeconfig cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class _Named:
    """A context, cluster or user entry, and the directory its relative paths are relative to."""

    section: str  # contexts, clusters or users
    name: str
    fields: dict[str, Any]
    base: Path
    source: Path


@dataclass(frozen=True)
class _PluginCredential:
    token: str | None
    certificate: str | None
    key: str | None
    expires_at: float | None  # time.time(); None: until the API server refuses it


@dataclass(frozen=True)
class _PluginSpec:
    """A user's ``exec`` entry, checked: what identifies the plugin's credential, and how to run it."""

    api_version: str
    command: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    provide_cluster_info: bool
    install_hint: str


# Credentials kept per (file, user, server, plugin). The cache's lock is only ever held for a lookup
# (the event loop takes it to forget); a plugin runs under a lock of its own key, so that callers
# who need the same credential at once wait for one run instead of each running it.
_plugin_credentials: dict[tuple[Any, ...], _PluginCredential] = {}
_cache_lock = threading.Lock()
_run_locks: dict[tuple[Any, ...], threading.Lock] = {}


def forget_plugin_credentials(token: str | None = None) -> None:
    """After a 401: the next login runs the credential plugin again (as client-go does). Given the
    refused ``token``, only a credential still holding it is forgotten: one that another caller
    has renewed since is kept, so that a burst of refusals runs the plugin once, not once each."""
    with _cache_lock:
        for key, credential in list(_plugin_credentials.items()):
            if token is None or credential.token == token:
                del _plugin_credentials[key]


def kubeconfig_paths() -> list[Path]:
    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        return [Path(os.path.expanduser(p.strip())) for p in listed.split(os.pathsep) if p.strip()]
    default = Path(os.path.expanduser("~/.kube/config"))
    return [default] if default.is_file() else []


def connection(paths: list[Path] | None = None) -> kopf.ConnectionInfo | None:
    """The current context's API server and credentials; None when there is no kubeconfig."""
    paths = kubeconfig_paths() if paths is None else paths
    if not paths:
        return None
    current, contexts, clusters, users = _merged(paths)
    if not current:
        raise KubeconfigError(f"{_names(paths)}: current-context is not set")
    context = _pick(contexts, current, "contexts", paths)
    cluster = _pick(clusters, _text(context, "cluster", required=True), "clusters", paths)
    user = _pick(users, _text(context, "user", required=True), "users", paths) if context.fields.get("user") else None
    server = _text(cluster, "server", required=True)
    # As in client-go, data wins over a path to the same thing.
    ca_data = _text(cluster, "certificate-authority-data") or None
    ca_path = None
    if not ca_data and cluster.fields.get("certificate-authority"):
        ca_path = str(_path(cluster, "certificate-authority"))
    return kopf.ConnectionInfo(
        server=server,
        ca_path=ca_path,
        ca_data=ca_data,
        insecure=_flag(cluster, "insecure-skip-tls-verify") or None,
        default_namespace=_text(context, "namespace") or None,
        # Decided once here, not by the HTTP client's trust_env: that looks the proxy and ~/.netrc
        # up in a thread on every request, and a netrc entry for the host breaks the bearer token.
        proxy_url=_proxy_url(cluster) or _environment_proxy(server),
        **(_credentials(user, cluster) if user is not None else {}),
    )


def _proxy_url(cluster: _Named) -> str | None:
    """The cluster's proxy-url: an http or https proxy (the client speaks no SOCKS), named
    here rather than failing on the first request."""
    value = _text(cluster, "proxy-url")
    return _checked_proxy(value, _where(cluster, "proxy-url")) if value else None


def _environment_proxy(server: str) -> str | None:
    """Without a proxy-url, as client-go (Go's httpproxy): HTTPS_PROXY for an https API server,
    HTTP_PROXY for an http one (each the first set of its upper and lower case), unless NO_PROXY
    names the host; never for a loopback API server. A bare host:port is an http proxy."""
    parts = urllib.parse.urlsplit(server)
    host = (parts.hostname or "").lower()
    if _loopback(host):
        return None
    name = "HTTPS_PROXY" if parts.scheme == "https" else "HTTP_PROXY"
    variable, proxy = _first_set(name, name.lower())
    if not proxy:
        return None
    port = str(parts.port or (443 if parts.scheme == "https" else 80))
    if _no_proxy(host, port, _first_set("NO_PROXY", "no_proxy")[1]):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    where = f"the {variable} environment variable"
    return _checked_proxy(proxy, where, "; or name the API server's host in NO_PROXY")


def _first_set(*names: str) -> tuple[str, str]:
    for name in names:
        if value := os.environ.get(name, ""):
            return name, value
    return names[0], ""


def _no_proxy(host: str, port: str, value: str) -> bool:
    """Whether NO_PROXY exempts host:port, by Go's rules: ``*`` is every host; an address or a CIDR
    block; a domain, which matches itself and its subdomains, or with a leading ``.`` (or ``*.``)
    its subdomains only; an address or a domain may carry a port, which must then match."""
    address = _ip(host)
    for entry in (item.strip().lower() for item in value.split(",")):
        if entry == "*":
            return True
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if address is not None and address in ipaddress.ip_network(entry, strict=False):
                    return True
            continue
        name, entry_port = _host_and_port(entry)
        if not name or (entry_port and entry_port != port):
            continue
        entry_address = _ip(name)
        if entry_address is not None:
            if entry_address == address:
                return True
            continue
        name = name[1:] if name.startswith("*.") else name
        if host.endswith(name if name.startswith(".") else "." + name) or host == name:
            return True
    return False


def _host_and_port(entry: str) -> tuple[str, str]:
    if entry.startswith("["):  # [fd00::1] or [fd00::1]:443
        address, _, rest = entry[1:].partition("]")
        return address, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, port
    return entry, ""  # a name, or an IPv6 address without brackets


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _checked_proxy(value: str, where: str, advice: str = "") -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        unsupported = f" ({parsed.scheme} is not supported)" if parsed.scheme not in ("", "http", "https") else ""
        raise KubeconfigError(f"{where}: an http:// or https:// proxy URL is expected{unsupported}{advice}")
    return value


def _loopback(host: str) -> bool:
    address = _ip(host)
    return host == "localhost" or host.endswith(".localhost") or (address is not None and address.is_loopback)


def _credentials(user: _Named, cluster: _Named) -> dict[str, Any]:
    """The user's credentials as kopf.ConnectionInfo's fields: a token (given, from a file, from
    the legacy auth-provider's cache, or from a plugin), a client certificate, a user and password."""
    fields = user.fields
    token = _text(user, "token") or None
    if fields.get("tokenFile"):  # as in client-go, the file wins over a token written beside it
        token_file = _path(user, "tokenFile")
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            raise KubeconfigError(f"{_where(user, 'tokenFile')}: cannot read {token_file}: {error}") from None
    provider = fields.get("auth-provider")
    if not token and provider is not None:
        token = _provider_token(provider, _where(user, "auth-provider"))
    certificate, key = _text(user, "client-certificate-data") or None, _text(user, "client-key-data") or None
    certificate_path = key_path = None
    if not certificate and fields.get("client-certificate"):
        certificate_path = str(_path(user, "client-certificate"))
    if not key and fields.get("client-key"):
        key_path = str(_path(user, "client-key"))
    expiration = None
    if fields.get("exec") is not None:
        plugin = _plugin_credential(user, cluster)
        token = plugin.token or token
        if plugin.certificate and plugin.key:
            certificate, key, certificate_path, key_path = plugin.certificate, plugin.key, None, None
        if plugin.expires_at is not None:
            expiration = datetime.datetime.fromtimestamp(plugin.expires_at, datetime.UTC)
    return {
        "certificate_path": certificate_path,
        "certificate_data": certificate,
        "private_key_path": key_path,
        "private_key_data": key,
        "username": _text(user, "username") or None,
        "password": _text(user, "password") or None,
        "scheme": "Bearer" if token else None,
        "token": token,
        "expiration": expiration,
    }


def _provider_token(provider: Any, where: str) -> str | None:
    """The token a legacy auth-provider cached: oidc sends its id-token; gcp and azure their
    access-token (client-go's plugins). Refreshing them is not done here: kubectl does it."""
    if not isinstance(provider, dict) or not isinstance(provider.get("config") or {}, dict):
        raise KubeconfigError(f"{where}: a mapping with a name and a config mapping is expected")
    config = provider.get("config") or {}
    token = config.get("id-token" if provider.get("name") == "oidc" else "access-token")
    if token is not None and not isinstance(token, str):
        raise KubeconfigError(f"{where}.config: the cached token must be a string")
    return token or None


def _merged(
    paths: list[Path],
) -> tuple[str | None, dict[str, _Named], dict[str, _Named], dict[str, _Named]]:
    current: str | None = None
    sections: dict[str, dict[str, _Named]] = {"contexts": {}, "clusters": {}, "users": {}}
    for path in paths:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue  # kubectl skips a listed file that is not there
        except (OSError, yaml.YAMLError) as error:
            raise KubeconfigError(f"{path}: cannot be read as YAML: {error}") from None
        if not isinstance(document, dict):
            raise KubeconfigError(f"{path}: not a kubeconfig (a mapping is expected)")
        if current is None and document.get("current-context"):
            if not isinstance(document["current-context"], str):
                raise KubeconfigError(f"{path}: current-context: a context's name is expected")
            current = document["current-context"]
        for section, entries in sections.items():
            field = section[:-1]  # each item is {name, context|cluster|user}
            items = document.get(section) or []
            if not isinstance(items, list):
                raise KubeconfigError(f"{path}: {section}: a list is expected")
            for index, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    raise KubeconfigError(f"{path}: {section}[{index}]: a mapping with a name is expected")
                fields = item.get(field) or {}
                if not isinstance(fields, dict):
                    raise KubeconfigError(f"{path}: {section}[{item['name']}].{field}: a mapping is expected")
                entries.setdefault(item["name"], _Named(section, item["name"], fields, path.absolute().parent, path))
    return current, sections["contexts"], sections["clusters"], sections["users"]


def _pick(entries: dict[str, _Named], name: str, section: str, paths: list[Path]) -> _Named:
    if name not in entries:
        raise KubeconfigError(f"{_names(paths)}: {section}[{name}] is not defined")
    return entries[name]


def _text(entry: _Named, field: str, required: bool = False) -> str:
    value = entry.fields.get(field)
    if value is None or value == "":
        if required:
            raise KubeconfigError(f"{_where(entry, field)}: required")
        return ""
    if not isinstance(value, str):
        raise KubeconfigError(f"{_where(entry, field)}: a string is expected")
    return value


def _flag(entry: _Named, field: str) -> bool:
    value = entry.fields.get(field, False)
    if not isinstance(value, bool):  # "false" is a string, and true to Python: refused, as client-go does
        raise KubeconfigError(f"{_where(entry, field)}: true or false is expected")
    return value


def _path(entry: _Named, field: str) -> Path:
    value = Path(os.path.expanduser(_text(entry, field)))
    return value if value.is_absolute() else entry.base / value


def _where(entry: _Named, field: str) -> str:
    return f"{entry.source}: {entry.section}[{entry.name}].{field}"


def _names(paths: list[Path]) -> str:
    return os.pathsep.join(str(p) for p in paths)


# --- credential plugins (exec) ----------------------------------------------------------------


def _plugin_credential(user: _Named, cluster: _Named) -> _PluginCredential:
    where = _where(user, "exec")
    spec = _plugin_spec(user.fields["exec"], where)
    key = (str(user.source), user.name, cluster.fields.get("server"), spec)
    with _cache_lock:
        run_lock = _run_locks.setdefault(key, threading.Lock())
    with run_lock:
        with _cache_lock:
            kept = _plugin_credentials.get(key)
        if kept is not None and (kept.expires_at is None or kept.expires_at - RENEW_BEFORE_SECONDS > time.time()):
            return kept
        credential = _run_plugin(spec, where, user.base, cluster)
        with _cache_lock:
            _plugin_credentials[key] = credential
        return credential


def _plugin_spec(spec: Any, where: str) -> _PluginSpec:
    if not isinstance(spec, dict):
        raise KubeconfigError(f"{where}: a mapping is expected")
    api_version = spec.get("apiVersion")
    if api_version not in EXEC_API_VERSIONS:
        raise KubeconfigError(f"{where}.apiVersion: {api_version!r} is not one of {', '.join(EXEC_API_VERSIONS)}")
    if spec.get("interactiveMode") == "Always":
        raise KubeconfigError(f"{where}.interactiveMode: Always needs a terminal, and the operator has none")
    command = spec.get("command")
    if not isinstance(command, str) or not command or "\0" in command:
        raise KubeconfigError(f"{where}.command: required (a path or a name on PATH)")
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
        raise KubeconfigError(f"{where}.args: a list of strings is expected")
    env = spec.get("env") or []
    if not isinstance(env, list):
        raise KubeconfigError(f"{where}.env: a list of {{name, value}} is expected")
    pairs = []
    for index, item in enumerate(env):
        name, value = (item.get("name"), item.get("value")) if isinstance(item, dict) else (None, None)
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise KubeconfigError(f"{where}.env[{index}].name: a variable name is expected")
        if not isinstance(value, str) or "\0" in value:
            raise KubeconfigError(f"{where}.env[{index}].value: a string is expected")
        pairs.append((name, value))
    hint = spec.get("installHint")
    return _PluginSpec(
        api_version, command, tuple(args), tuple(pairs), spec.get("provideClusterInfo") is True,
        hint.strip() if isinstance(hint, str) else "",
    )  # fmt: skip


def _run_plugin(spec: _PluginSpec, where: str, base: Path, cluster: _Named) -> _PluginCredential:
    env = {**os.environ, **dict(spec.env)}
    exec_info: dict[str, Any] = {
        "apiVersion": spec.api_version, "kind": "ExecCredential", "spec": {"interactive": False}
    }  # fmt: skip
    if spec.provide_cluster_info:
        exec_info["spec"]["cluster"] = _cluster_info(cluster)
    try:
        env["KUBERNETES_EXEC_INFO"] = json.dumps(exec_info)
    except (TypeError, ValueError, RecursionError):
        raise KubeconfigError(f"{_where(cluster, 'extensions')}: cannot be passed to a plugin as JSON") from None
    command = spec.command
    # client-go: a command with a slash in it and not absolute is relative to the kubeconfig.
    executable = str(base / command) if os.sep in command and not os.path.isabs(command) else _on_path(command)
    if executable is None or not os.path.exists(executable):
        hint = f" ({spec.install_hint})" if spec.install_hint else ""
        raise KubeconfigError(f"{where}.command: {command!r} was not found{hint}")
    try:
        done = subprocess.run(  # noqa: S603 - the command the kubeconfig's owner named, as kubectl runs it
            [executable, *spec.args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PLUGIN_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KubeconfigError(f"{where}: {command!r} gave no answer within {PLUGIN_TIMEOUT_SECONDS:g} s") from None
    except (OSError, ValueError) as error:
        raise KubeconfigError(f"{where}.command: cannot run {command!r}: {error}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()[-_MESSAGE_BYTES:]
        raise KubeconfigError(f"{where}: {command!r} exited with {done.returncode}: {said}")
    return _parse_credential(done.stdout, spec.api_version, where)


def _parse_credential(output: bytes, api_version: str, where: str) -> _PluginCredential:
    try:
        answer = json.loads(output)
    except (ValueError, RecursionError):
        # Never its content: a plugin set up wrongly may print a bare token.
        raise KubeconfigError(f"{where}: the plugin's output ({len(output)} bytes) is not JSON") from None
    if not isinstance(answer, dict) or answer.get("kind") != "ExecCredential":
        raise KubeconfigError(f"{where}: the plugin's output is not an ExecCredential")
    if answer.get("apiVersion") != api_version:
        raise KubeconfigError(f"{where}: the plugin answered {answer.get('apiVersion')!r}, not {api_version!r}")
    status = answer.get("status")
    if not isinstance(status, dict):
        raise KubeconfigError(f"{where}: the plugin's ExecCredential has no status")
    token = status.get("token") or None
    certificate, key = status.get("clientCertificateData") or None, status.get("clientKeyData") or None
    if bool(certificate) != bool(key):
        raise KubeconfigError(f"{where}: status.clientCertificateData and status.clientKeyData come together")
    if not token and not certificate:
        raise KubeconfigError(f"{where}: the plugin's ExecCredential holds neither a token nor a client certificate")
    for field, value in (("token", token), ("clientCertificateData", certificate), ("clientKeyData", key)):
        if value is not None and not isinstance(value, str):
            raise KubeconfigError(f"{where}: status.{field}: a string is expected")
    expires_at = None
    stamp = status.get("expirationTimestamp")
    if stamp:
        try:
            parsed = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            raise KubeconfigError(f"{where}: status.expirationTimestamp {stamp!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        expires_at = parsed.timestamp()
        if expires_at <= time.time():
            # Expired as issued (a clock skewed from the plugin's): kept until refused instead, or
            # kopf would log in again, and the plugin run again, on every request.
            log.warning(
                "%s: the plugin's credential expired at %s, before it was issued; kept until refused", where, stamp
            )
            expires_at = None
    return _PluginCredential(token, certificate, key, expires_at)


def _on_path(command: str) -> str | None:
    """A plugin found by name on PATH, skipping PATH's relative entries (an empty one is the
    working directory): a plugin is never what happens to be in the directory the operator was
    started in, as Go's exec.LookPath refuses it."""
    absolute = [entry for entry in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(entry)]
    return shutil.which(command, path=os.pathsep.join(absolute)) if absolute else None


def _cluster_info(cluster: _Named) -> dict[str, Any]:
    """What a plugin with provideClusterInfo is told of the cluster (client-go's Cluster)."""
    info: dict[str, Any] = {"server": cluster.fields.get("server")}
    if cluster.fields.get("certificate-authority-data"):
        info["certificate-authority-data"] = cluster.fields["certificate-authority-data"]
    elif cluster.fields.get("certificate-authority"):
        ca = _path(cluster, "certificate-authority")
        try:
            info["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
        except OSError as error:
            raise KubeconfigError(f"{_where(cluster, 'certificate-authority')}: cannot read {ca}: {error}") from None
    for field in ("tls-server-name", "insecure-skip-tls-verify", "proxy-url"):
        if cluster.fields.get(field) is not None:
            info[field] = cluster.fields[field]
    extensions = cluster.fields.get("extensions")
    for item in extensions if isinstance(extensions, list) else []:
        if isinstance(item, dict) and item.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = item.get("extension")
    return info

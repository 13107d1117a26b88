"""The only module that talks to the Kubernetes API (besides kopf's own watches).

Writes are server-side apply with one field manager; every write is counted by verb and resource
in ``api_writes_total`` so a resync that should be a no-op can be shown to be one.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import orjson

from agent_operator import kubeconfig, metrics, timefmt
from agent_operator.kinds import kind_of
from agent_operator.render.common import MANAGER
from agent_operator.spec import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("agent_operator")
USER_AGENT = f"{MANAGER}/0.1.0"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Metadata only (name, namespace, resourceVersion, labels, annotations), as client-go's metadata
# informers ask for it: a Secret's data never crosses the wire, however large.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
REQUEST_CONNECTIONS = 32
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)
# A metadata watch silent this long is taken as dead (a half-open connection, a stuck proxy) and
# fails, so what trusts it reads instead until it is listed again: the API server sends a bookmark
# every minute to a watch that asks for them.
WATCH_IDLE_SECONDS = 120
CREDENTIALS_SECONDS = 60.0
CREDENTIALS_RETRY_SECONDS = 5.0


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when no response came)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(f"{status} {reason}: {_message(body)}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def _message(body: str) -> str:
    try:
        return str(json.loads(body).get("message", body))
    except (ValueError, AttributeError):
        return body[:500]


def object_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    found = kind_of(api_version, kind)
    prefix, plural = found.path_prefix, found.plural
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _watch_event(event: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A watch event as (type, object); an ERROR event (410 Gone: the version is too old) raised."""
    type_, obj = str(event.get("type") or ""), dict(event.get("object") or {})
    if type_ == "ERROR":
        raise KubeError(int(obj.get("code") or 0), str(obj.get("reason") or "error"), json.dumps(obj))
    return type_, obj


def _plural(manifest: Mapping[str, Any]) -> str:
    return kind_of(manifest["apiVersion"], manifest["kind"]).plural


def in_cluster_connection() -> kopf.ConnectionInfo | None:
    """kopf's credentials in a pod, found the way client-go (and ``Kube.connect``) finds them: the
    API server from KUBERNETES_SERVICE_HOST/PORT, the mounted ServiceAccount token and CA. kopf's own
    in-cluster login dials https://kubernetes.default.svc instead, which needs cluster DNS."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token = SERVICE_ACCOUNT_DIR / "token"
    if not host or not port or not token.is_file():
        return None
    namespace = SERVICE_ACCOUNT_DIR / "namespace"
    return kopf.ConnectionInfo(
        server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
        ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        scheme="Bearer",
        token=token.read_text().strip(),  # re-read on every login: the kubelet rotates it
        default_namespace=namespace.read_text().strip() if namespace.is_file() else None,
    )


def login() -> kopf.ConnectionInfo:
    """The credentials both kopf's watches and ``Kube`` use: the ServiceAccount's in a pod, else
    the kubeconfig's (KUBECONFIG, else ~/.kube/config) as kubectl reads it (kubeconfig.py:
    credential plugins too). One reader for both, so
    the operator's requests and its watches can never run as two different identities."""
    info = in_cluster_connection() or kubeconfig.connection()
    if info is None:
        raise KubeError(0, "no credentials", "not in a pod, and no KUBECONFIG or ~/.kube/config")
    return info


class Kube:
    """A thin async client on aiohttp: apply, create, delete, get, status and events, nothing more.

    Not the generated Kubernetes client: its models are never used here (every body is a plain
    dict), and importing it costs the operator tens of MiB at rest."""

    def __init__(self, connect: Callable[[], kopf.ConnectionInfo] = login) -> None:
        self._connect = connect
        info = connect()
        self.server = info.server.rstrip("/")
        self._authorization = info.as_http_headers()
        self._token = info.token
        self._authorized_at = time.monotonic()
        ssl_context = info.as_ssl_context()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=REQUEST_CONNECTIONS, ssl=ssl_context),
            proxy=info.proxy_url,
            trust_env=info.trust_env,
        )
        # Watches hold their connection for minutes: on their own pool, so that however many
        # namespaces are watched, requests never wait for a connection a watch holds.
        self.stream_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context), proxy=info.proxy_url, trust_env=info.trust_env
        )
        self.identify(None)

    def identify(self, identity: str | None) -> None:
        self.user_agent = f"{USER_AGENT} ({identity})" if identity else USER_AGENT

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
        return cls()

    async def close(self) -> None:
        await self.session.close()
        await self.stream_session.close()

    async def _headers(self, content_type: str | None, accept: str, refresh: bool = False) -> dict[str, str]:
        if refresh:  # refused: a credential plugin is asked again (unless another caller has already)
            kubeconfig.forget_plugin_credentials(self._token)
        if refresh or time.monotonic() - self._authorized_at > CREDENTIALS_SECONDS:
            await self._reauthorize()
        headers = {**self._authorization, "Accept": accept, "User-Agent": self.user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _reauthorize(self) -> None:
        """Reads the credentials again, as client-go re-reads a projected ServiceAccount token the
        kubelet rotates: now and then, and at once after a 401. A read that fails (a kubeconfig
        being rewritten, a token file being swapped) keeps the credentials in use and is tried
        again shortly; so are credentials for another API server (a kubeconfig's context
        switched): requests and watches must not go to two clusters, nor a token to the wrong one."""
        self._authorized_at = time.monotonic() - CREDENTIALS_SECONDS + CREDENTIALS_RETRY_SECONDS
        try:
            info = await asyncio.to_thread(self._connect)  # a credential plugin may take seconds
        except Exception as error:  # whatever the reader raises, requests go on with what they had
            log.warning("could not read the API credentials again, still using the previous ones: %s", error)
            return
        if info.server.rstrip("/") != self.server:
            log.warning("the credentials now name API server %s, not %s: not switching", info.server, self.server)
            return
        self._authorization = info.as_http_headers()
        self._token = info.token
        self._authorized_at = time.monotonic()

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        resource: str = "",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        if method != "GET":
            metrics.API_WRITES.labels(verb=method.lower(), resource=resource).inc()
        with metrics.API_REQUEST_DURATION.labels(verb=method.lower()).time():
            return await self._send(method, path, body, query, content_type, accept)

    async def _send(
        self, method: str, path: str, body: Any, query: list[tuple[str, str]] | None, content_type: str, accept: str
    ) -> dict[str, Any]:
        # orjson: what the API server sends and takes holds no integer beyond 64 bits (it decodes
        # JSON into int64 or float64), and the standard library's was 3 % of the operator's CPU.
        # Keys that are not plain str (a StrEnum) are written as json.dumps wrote them, not refused.
        data = None if body is None else orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
        for refresh in (False, True):
            try:
                async with self.session.request(
                    method,
                    self.server + path,
                    params=query or [],
                    data=data,
                    headers=await self._headers(content_type if data is not None else None, accept, refresh),
                    timeout=REQUEST_TIMEOUT,
                ) as response:
                    content = await response.read()
                    status, reason = response.status, response.reason
            except (aiohttp.ClientError, TimeoutError) as error:
                raise KubeError(0, type(error).__name__, str(error)) from None
            if status != 401 or refresh:
                break
        if not 200 <= status <= 299:
            raise KubeError(status, reason or "error", content.decode(errors="replace"))
        result: dict[str, Any] = orjson.loads(content) if content else {}
        return result

    async def apply(self, manifest: Mapping[str, Any], force: bool = True) -> dict[str, Any]:
        """Server-side apply as our field manager. ``force`` takes over fields another manager
        set (drift repair); fields we do not set stay with whoever owns them."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", MANAGER), ("force", "true" if force else "false")]
        return await self._request(
            "PATCH", path, dict(manifest), query, "application/apply-patch+yaml", _plural(manifest)
        )

    async def apply_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        """Server-side apply of the status; with ``resource_version``, only over that version of
        the agent (409 otherwise)."""
        metadata = {"name": name, "namespace": namespace}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "status": status}
        path = object_path(f"{GROUP}/{VERSION}", KIND, namespace, name, "status")
        query = [("fieldManager", MANAGER), ("force", "true")]
        return await self._request("PATCH", path, body, query, "application/apply-patch+yaml", f"{PLURAL}/status")

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        return await self._request("POST", path, manifest, [("fieldManager", MANAGER)], resource=_plural(manifest))

    async def replace(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """PUT with the manifest's resourceVersion: fails with 409 if someone wrote in between."""
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        return await self._request("PUT", path, manifest, [("fieldManager", MANAGER)], resource=_plural(manifest))

    async def patch_json(
        self, api_version: str, kind: str, namespace: str, name: str, operations: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """An RFC 6902 JSON patch; a ``replace`` of /metadata/resourceVersion in it makes it apply
        only over that version (409 otherwise)."""
        path = object_path(api_version, kind, namespace, name)
        plural = _plural({"apiVersion": api_version, "kind": kind})
        query = [("fieldManager", MANAGER)]
        return await self._request("PATCH", path, operations, query, "application/json-patch+json", plural)

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self._request("GET", object_path(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a kind (in one namespace, or all), with apiVersion and kind filled in and
        without managedFields: nobody reads them, they are often the largest part of an object,
        and a relist holds every listed object at once beside the caches."""
        query = [("labelSelector", label_selector)] if label_selector else []
        items: list[dict[str, Any]] = []
        continue_token = None
        while True:
            page = query + ([("continue", continue_token)] if continue_token else []) + [("limit", "500")]
            result = await self._request("GET", object_path(api_version, kind, namespace), query=page)
            for item in result.get("items", []):
                metadata = {k: v for k, v in (item.get("metadata") or {}).items() if k != "managedFields"}
                items.append({"apiVersion": api_version, "kind": kind, **item, "metadata": metadata})
            continue_token = (result.get("metadata") or {}).get("continue")
            if not continue_token:
                return items

    async def list_metadata(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        keep: Callable[[Mapping[str, Any]], bool],
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """The metadata of every object of a kind (in one namespace, or all) that ``keep`` wants,
        and the list's resourceVersion to watch from. A page at a time: what ``keep`` does not
        want is dropped with its page, so listing beside thousands of unrelated objects costs
        one page of metadata, not all of them."""
        kept: list[dict[str, Any]] = []
        continue_token = None
        while True:
            page = [("limit", "500")] + ([("continue", continue_token)] if continue_token else [])
            result = await self._request(
                "GET", object_path(api_version, kind, namespace), query=page, accept=METADATA_LIST
            )
            for item in result.get("items") or []:
                metadata = item.get("metadata") or {}
                if keep(metadata):
                    kept.append({"metadata": {k: v for k, v in metadata.items() if k != "managedFields"}})
            list_metadata = result.get("metadata") or {}
            continue_token = list_metadata.get("continue")
            if not continue_token:
                return kept, str(list_metadata.get("resourceVersion") or "")

    async def watch_metadata(
        self, api_version: str, kind: str, namespace: str | None, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object with its metadata only) from ``resource_version`` on, with
        bookmarks, until the API server ends the watch after ``timeout_seconds``. Raises KubeError:
        410 when the version is too old (list again), the status of any other error event or
        response, 0 when the connection fails."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        try:
            response = await self.stream_session.get(
                self.server + object_path(api_version, kind, namespace),
                params=query,
                headers=await self._headers(None, METADATA),
                timeout=aiohttp.ClientTimeout(
                    total=timeout_seconds + 30, sock_connect=30, sock_read=WATCH_IDLE_SECONDS
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeError(0, type(error).__name__, str(error)) from None
        try:
            if response.status != 200:
                raise KubeError(
                    response.status, response.reason or "error", (await response.read()).decode(errors="replace")
                )
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _watch_event(orjson.loads(line))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise KubeError(0, type(error).__name__, str(error)) from None
        finally:
            response.release()

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.get(api_version, kind, namespace, name)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            await self._request(
                "DELETE",
                object_path(api_version, kind, namespace, name),
                {"propagationPolicy": "Background"},
                resource=kind_of(api_version, kind).plural,
            )
        except KubeError as error:
            if not error.not_found:
                raise

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str, component: str
    ) -> None:
        meta = involved["metadata"]
        now = timefmt.rfc3339(timefmt.now())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", "local"),
            "action": reason,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create(event)

"""The A2A agent card: ``GET /.well-known/agent-card.json``, how other agents discover this one.

The card follows the AgentCard of A2A (Agent2Agent protocol) v0.3: name, description, version,
capabilities, skills and security schemes. It is public, as A2A expects (a client reads it before it
holds a token), so it is built from an allow-list of what a caller needs, never by filtering the
config: the enabled operations as skills with their input schemas, and how to get a token. Users,
role members, keys, the model's endpoint and key variable, the database, file paths and egress
hosts never reach it.

Its ``url`` is the address the client reached (the request's scheme and Host, or the trusted
ingress's X-Forwarded-Proto/-Host), never one the runtime knows of itself: that would be the pod's
address or the cluster's DNS name. The rest depends only on the config, so it is rendered once per
app and only the address is spliced in per request.

This runtime answers its own HTTP API, not A2A's message and task methods: each skill is called as
``POST {url}/v1/operations/{skill id}``, which the card declares as an extension
(``OPERATIONS_EXTENSION``) and documents at ``documentationUrl`` (the OpenAPI document).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from agent_contract.config import AuthConfig, AuthMode, ComplianceConfig, ComplianceFramework, RuntimeConfig
from agent_contract.layout import AGENT_CARD_PATH
from agent_runtime.api import ApiError, from_trusted_proxy
from agent_runtime.openapi import operation_input_schema
from agent_runtime.operations import Operation, Registry
from agent_runtime.routing import ERROR, JSON_MEDIA_TYPE, Reply, Route

CARD_PATH = AGENT_CARD_PATH  # A2A v0.3 (v0.2 used agent.json)
A2A_PROTOCOL_VERSION = "0.3.0"
# The closest A2A transport: HTTP with JSON bodies. The paths are this runtime's own (see the extension).
TRANSPORT = "HTTP+JSON"
OPERATIONS_EXTENSION_URI = "urn:agents.enterprise.io:a2a:operations:v1"
OPERATION_PATH = "/v1/operations/{id}"
EVENT_STREAM = "text/event-stream"
OPENAPI_PATH = "/openapi.json"
# Shared caches may keep it a while; the ETag makes revalidation cheap. A new config means a new
# rollout (new pods), so a stale card lives at most this long.
CACHE_CONTROL = "public, max-age=300"
# The url comes from these (Host is part of every cache key already).
VARY = "X-Forwarded-Host, X-Forwarded-Proto"

# A host name or IPv4 address, or a bracketed IPv6 address, with an optional port: nothing that
# could carry a user, a path or markup into the card.
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")

# A2A skills have no field for an input schema: each skill carries its operation's under the
# ``inputSchema`` key, which this extension declares (clients that do not know it ignore it).
OPERATIONS_EXTENSION: dict[str, Any] = {
    "uri": OPERATIONS_EXTENSION_URI,
    "description": (
        "Skills are this agent's operations, called over its own HTTP API rather than A2A messages: "
        f"POST {{url}}{OPERATION_PATH} with a bearer access token and the JSON body "
        '{"input": ...}, the input matching the skill\'s inputSchema (JSON Schema 2020-12). '
        "A skill with text/event-stream among its outputModes streams its answer as server-sent events "
        "when asked with Accept: text/event-stream. "
        "Skills tagged consent-required also take the data subject and the purpose of processing "
        '("subject", "purpose"); skills tagged approval-required answer 202 and run once approved. '
        "The full API is described at documentationUrl (OpenAPI 3.1)."
    ),
    "required": False,
    "params": {"operationPath": OPERATION_PATH, "inputField": "input", "skillSchemaKey": "inputSchema"},
}


@dataclass(frozen=True)
class AgentCard:
    """The card of one app, rendered once: all but the address, which each request supplies."""

    fields: dict[str, Any]  # the card without url and documentationUrl
    rendered: bytes  # ``fields`` as JSON, without its opening brace: the address is spliced in front

    @classmethod
    def of(cls, fields: dict[str, Any]) -> AgentCard:
        return cls(fields, json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()[1:])

    def render(self, base_url: str) -> bytes:
        address = json.dumps({"url": base_url, "documentationUrl": base_url + OPENAPI_PATH}, separators=(",", ":"))
        return address.encode()[:-1] + b"," + self.rendered


def build_card(config: RuntimeConfig, registry: Registry) -> AgentCard:
    """The card of an agent with this config serving these operations (what ``create_app`` enabled)."""
    schemes = _security_schemes(config.auth)
    fields: dict[str, Any] = {
        "protocolVersion": A2A_PROTOCOL_VERSION,
        "name": config.agent_name,
        "description": _description(config),
        "preferredTransport": TRANSPORT,
        "capabilities": {
            # Server-sent events, from the operations that can stream their answer (chat).
            "streaming": any(operation.stream is not None for operation in registry.operations.values()),
            "pushNotifications": False,
            "stateTransitionHistory": False,
            "extensions": [OPERATIONS_EXTENSION],
        },
        "defaultInputModes": [JSON_MEDIA_TYPE],
        "defaultOutputModes": [JSON_MEDIA_TYPE],
        "skills": [_skill(name, operation, config.compliance) for name, operation in registry.operations.items()],
        "securitySchemes": schemes,
        "security": [{name: []} for name in schemes],  # any one of them (OpenAPI's requirement list)
        "supportsAuthenticatedExtendedCard": False,
    }
    # The agent's version as A2A means it ("defined by the provider"): a digest of what the card
    # says, so it changes exactly when the agent's skills or security change, and names nothing else.
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return AgentCard.of({"version": digest[:12], **fields})


def _description(config: RuntimeConfig) -> str:
    text = (
        f"{config.agent_name}: an Enterprise Agent in namespace {config.namespace}, "
        f"handling data classified up to {config.security_level.value}"
    )
    frameworks = [framework.value for framework in config.compliance.frameworks]
    return text + (f", under {', '.join(frameworks)}." if frameworks else ".")


def _skill(name: str, operation: Operation, compliance: ComplianceConfig) -> dict[str, Any]:
    # Tags say what a caller needs to be allowed to call it, and what compliance asks of the call.
    tags = [f"permission:{operation.permission.value}", f"level:{operation.level.value}"]
    if operation.personal_data:
        tags.append("personal-data")
        if ComplianceFramework.GDPR in compliance.frameworks:
            tags.append("consent-required")
    if ComplianceFramework.SOX in compliance.frameworks and name in compliance.financial_operations:
        tags.append("approval-required")
    return {
        "id": name,
        "name": name.replace("_", " ").capitalize(),
        "description": operation.description,
        "tags": tags,
        "inputModes": [JSON_MEDIA_TYPE],
        "outputModes": [JSON_MEDIA_TYPE, EVENT_STREAM] if operation.stream is not None else [JSON_MEDIA_TYPE],
        "inputSchema": operation_input_schema(operation),  # the extension's key (see OPERATIONS_EXTENSION)
    }


def _security_schemes(auth: AuthConfig) -> dict[str, dict[str, Any]]:
    """OpenAPI 3 security schemes: this agent's own login (local), or its OpenID Connect issuer."""
    if auth.mode is AuthMode.OIDC:
        description = "An access token (a JWT) from the agent's OpenID Connect issuer"
        discovery = oidc_discovery_url(auth.issuer)
        if discovery is not None:
            return {"oidc": {"type": "openIdConnect", "openIdConnectUrl": discovery, "description": description}}
        # An issuer that is no URL has no discovery document to point at: the token is still a bearer JWT.
        return {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": description}}
    description = "An access token from POST /v1/auth/login (username and password)"
    return {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": description}}


def oidc_discovery_url(issuer: str) -> str | None:
    """OpenID Connect Discovery's address for an issuer (its URL + /.well-known/openid-configuration),
    or None when the issuer is no http(s) URL or carries credentials, a query or a fragment
    (which an issuer identifier may not have, and the card must not publish)."""
    try:
        parts = urlsplit(issuer)
    except ValueError:
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        return None
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def _single_header(request: web.Request, name: str) -> str | None:
    """A forwarded header's value, when a proxy set exactly one (a list: whose hop it was is unclear)."""
    values = request.headers.getall(name, ())
    if len(values) != 1 or "," in values[0]:
        return None
    return values[0].strip()


def public_base_url(request: web.Request) -> str:
    """Where the client reached this agent: the request's scheme and Host, or what the ingress (a
    peer in auth.trustedProxies) says it saw. Never the socket's own address, which is the pod's."""
    scheme, host = request.scheme, request.headers.get(hdrs.HOST)
    if from_trusted_proxy(request):
        forwarded_proto = _single_header(request, hdrs.X_FORWARDED_PROTO)
        if forwarded_proto is not None and forwarded_proto.lower() in ("http", "https"):
            scheme = forwarded_proto.lower()
        forwarded_host = _single_header(request, hdrs.X_FORWARDED_HOST)
        if forwarded_host is not None and _HOST.fullmatch(forwarded_host):
            host = forwarded_host
    if host is None or not _HOST.fullmatch(host):
        raise ApiError(
            400, "invalid_host", "Host: a host name or address with an optional port is required (the card's url)"
        )
    return f"{scheme}://{host}"


CARD = web.AppKey("agent_card", AgentCard)  # this room's own: nothing else reads the rendered card


async def agent_card_view(request: web.Request) -> web.Response:
    body = request.app[CARD].render(public_base_url(request))
    etag = hashlib.sha256(body).hexdigest()[:32]  # the address is part of the body, so of the tag
    response = web.Response(headers={hdrs.CACHE_CONTROL: CACHE_CONTROL, hdrs.VARY: VARY})
    response.etag = etag
    # If-None-Match compares weakly (RFC 9110 13.1.2): a weak tag of ours matches too.
    if any(tag.value in ("*", etag) for tag in request.if_none_match or ()):
        response.set_status(304)
        return response
    response.body = body
    response.content_type = JSON_MEDIA_TYPE
    return response


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        CARD_PATH,
        agent_card_view,
        "The A2A agent card: this agent's skills (its enabled operations) and how to authenticate",
        public=True,  # A2A clients read it before they hold a token; it holds nothing secret
        replies=(
            Reply(200, "Agent card (A2A v0.3)", media_type=JSON_MEDIA_TYPE),
            Reply(304, "Not modified (If-None-Match)"),
            Reply(400, "No Host header, or not a host name or address", ERROR),
        ),
    ),
)

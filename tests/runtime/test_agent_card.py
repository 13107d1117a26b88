"""The A2A agent card at /.well-known/agent-card.json, as a client without a token reads it: the shape
of A2A v0.3's AgentCard, exactly the enabled operations as skills with their input schemas, security
schemes that follow the auth mode, an address that is the one the client reached, caching headers,
and nothing secret or internal even when the config is full of it."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from agent_runtime.app import create_app
from agent_runtime.operations import BUILTINS
from agent_runtime.operations.analyze import AnalyzeInput
from agent_runtime.security.users import hash_line
from agent_runtime.settings import Settings
from eao_devtools.testkit.postgres import PostgresServer
from tests.fake_model import make_tls
from tests.runtime.conftest import MATRIX_OPERATIONS, AppFactory, login, make_layout
from tests.runtime.test_observability import samples

Client = TestClient[web.Request, web.Application]
CARD = "/.well-known/agent-card.json"

_STRINGS = {"type": "array", "items": {"type": "string"}}
_URL = {"type": "string", "pattern": r"^https?://[^\s/?#@]+(/[^\s]*)?$"}
# The security schemes A2A allows (OpenAPI 3's, plus mutual TLS), each with its required fields.
_SECURITY_SCHEME = {
    "oneOf": [
        {"properties": {"type": {"const": "apiKey"}}, "required": ["type", "in", "name"]},
        {"properties": {"type": {"const": "http"}, "scheme": {"type": "string"}}, "required": ["type", "scheme"]},
        {"properties": {"type": {"const": "oauth2"}}, "required": ["type", "flows"]},
        {
            "properties": {"type": {"const": "openIdConnect"}, "openIdConnectUrl": _URL},
            "required": ["type", "openIdConnectUrl"],
        },
        {"properties": {"type": {"const": "mutualTLS"}}, "required": ["type"]},
    ]
}
_SKILL = {
    "type": "object",
    "required": ["id", "name", "description", "tags"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "tags": _STRINGS,
        "examples": _STRINGS,
        "inputModes": _STRINGS,
        "outputModes": _STRINGS,
    },
}
# A2A v0.3's AgentCard: its required fields and the types of those the card uses.
A2A_AGENT_CARD = {
    "type": "object",
    "required": [
        "protocolVersion",
        "name",
        "description",
        "url",
        "version",
        "capabilities",
        "defaultInputModes",
        "defaultOutputModes",
        "skills",
    ],
    "properties": {
        "protocolVersion": {"type": "string", "pattern": r"^0\.3\.[0-9]+$"},
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "url": _URL,
        "preferredTransport": {"enum": ["JSONRPC", "GRPC", "HTTP+JSON"]},
        "version": {"type": "string", "minLength": 1},
        "documentationUrl": _URL,
        "capabilities": {
            "type": "object",
            "properties": {
                "streaming": {"type": "boolean"},
                "pushNotifications": {"type": "boolean"},
                "stateTransitionHistory": {"type": "boolean"},
                "extensions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["uri"],
                        "properties": {
                            "uri": {"type": "string"},
                            "description": {"type": "string"},
                            "required": {"type": "boolean"},
                            "params": {"type": "object"},
                        },
                    },
                },
            },
        },
        "defaultInputModes": _STRINGS,
        "defaultOutputModes": _STRINGS,
        "skills": {"type": "array", "items": _SKILL},
        "securitySchemes": {"type": "object", "additionalProperties": _SECURITY_SCHEME},
        "security": {"type": "array", "items": {"type": "object", "additionalProperties": _STRINGS}},
        "supportsAuthenticatedExtendedCard": {"type": "boolean"},
    },
}
A2A = Draft202012Validator(A2A_AGENT_CARD)


def a2a_problems(card: dict[str, Any]) -> list[str]:
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in A2A.iter_errors(card)]
    declared = set(card.get("securitySchemes", {}))
    problems += [
        f"security names undeclared scheme {name!r}"
        for r in card.get("security", [])
        for name in r
        if name not in declared
    ]
    return problems


async def fetch_card(client: Client, **headers: str) -> tuple[dict[str, Any], str]:
    response = await client.get(CARD, headers=headers)
    text = await response.text()
    assert response.status == 200, text
    assert response.content_type == "application/json"
    card: dict[str, Any] = await response.json()
    return card, text


def skills(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {skill["id"]: skill for skill in card["skills"]}


async def test_the_card_is_public_and_has_the_shape_of_an_a2a_agent_card(make_client: AppFactory) -> None:
    client = await make_client()
    card, _ = await fetch_card(client)  # no Authorization header
    assert a2a_problems(card) == []
    assert card["name"] == "test-agent"
    assert card["protocolVersion"] == "0.3.0"
    assert card["url"] == f"http://{client.host}:{client.port}"
    assert card["documentationUrl"] == card["url"] + "/openapi.json"
    assert (await client.get("/openapi.json")).status == 200  # where documentationUrl points, also public
    assert card["capabilities"]["pushNotifications"] is False
    assert card["supportsAuthenticatedExtendedCard"] is False
    # The check has teeth: a card without its url, or with a skill without tags, is not one.
    assert a2a_problems({key: value for key, value in card.items() if key != "url"})
    assert a2a_problems({**card, "skills": [{"id": "x", "name": "x", "description": "x"}]})
    # And it is listed in the OpenAPI document as needing no token.
    document = await (await client.get("/openapi.json")).json()
    assert document["paths"][CARD]["get"]["security"] == []


async def test_the_skills_are_exactly_the_enabled_operations_with_their_input_schemas(
    make_client: AppFactory,
) -> None:
    # not_installed is enabled in the config but no code provides it: the runtime does not serve
    # it, so the card does not offer it.
    client = await make_client(operations=["ping", "analyze_data", "not_installed", "read_public", "admin_restricted"])
    card, _ = await fetch_card(client)
    offered = skills(card)
    assert list(offered) == ["ping", "analyze_data", "read_public", "admin_restricted"]
    analyze = offered["analyze_data"]
    assert analyze["description"] == BUILTINS["analyze_data"].description
    assert analyze["tags"] == ["permission:execute", "level:internal"]
    assert offered["admin_restricted"]["tags"] == ["permission:admin", "level:restricted"]
    assert analyze["inputSchema"] == AnalyzeInput.model_json_schema()
    assert offered["ping"]["inputSchema"] == {"type": "object"}  # ping declares no model: any object
    for skill in offered.values():
        Draft202012Validator.check_schema(skill["inputSchema"])

    # The published schema is the one the runtime enforces: what it accepts runs, what it refuses gets 422.
    schema = Draft202012Validator(analyze["inputSchema"])
    good = {"data": [{"x": 1, "y": 2}, {"x": 2, "y": 4}, {"x": 3, "y": 7}]}
    bad = {"data": "not records"}
    assert schema.is_valid(good)
    assert not schema.is_valid(bad)
    headers = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    path = "/v1/operations/analyze_data"
    assert (await client.post(path, json={"input": good}, headers=headers)).status == 200
    assert (await client.post(path, json={"input": bad}, headers=headers)).status == 422
    for skill_id in offered:
        assert (await client.post(f"/v1/operations/{skill_id}", json={}, headers=headers)).status != 404


async def test_compliance_shows_in_the_tags_a_caller_must_act_on(make_client: AppFactory) -> None:
    client = await make_client(
        securityLevel="confidential",
        operations=["process_document", "analyze_data", "ping"],
        compliance={"frameworks": ["GDPR", "SOX"], "financialOperations": ["analyze_data"]},
    )
    card, _ = await fetch_card(client)
    offered = skills(card)
    assert offered["process_document"]["tags"] == [
        "permission:execute", "level:confidential", "personal-data", "consent-required",
    ]  # fmt: skip
    assert offered["analyze_data"]["tags"] == ["permission:execute", "level:internal", "approval-required"]
    assert offered["ping"]["tags"] == ["permission:execute", "level:public"]
    assert "GDPR, SOX" in card["description"]
    assert "confidential" in card["description"]


async def test_security_schemes_follow_the_auth_mode(make_client: AppFactory) -> None:
    local, _ = await fetch_card(await make_client())
    assert local["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token from POST /v1/auth/login (username and password)",
        }
    }
    assert local["security"] == [{"bearer": []}]

    issuer = "https://login.example.test/realms/agents"
    oidc_auth = {"mode": "oidc", "issuer": issuer, "jwksUri": f"{issuer}/protocol/openid-connect/certs"}
    oidc, text = await fetch_card(await make_client(auth=oidc_auth))
    assert a2a_problems(oidc) == []
    assert oidc["securitySchemes"] == {
        "oidc": {
            "type": "openIdConnect",
            "openIdConnectUrl": f"{issuer}/.well-known/openid-configuration",
            "description": "An access token (a JWT) from the agent's OpenID Connect issuer",
        }
    }
    assert oidc["security"] == [{"oidc": []}]
    assert "/protocol/openid-connect/certs" not in text  # discovery names the JWKS; the card need not
    assert oidc["version"] != local["version"]  # a different way in is a different card


@pytest.mark.parametrize(
    "issuer", ["corp-idp", "https://admin:hunter2@idp.example.test/realms/a", "ftp://idp.example.test"]
)
async def test_an_issuer_without_a_discovery_url_is_a_plain_bearer_scheme(make_client: AppFactory, issuer: str) -> None:
    auth = {"mode": "oidc", "issuer": issuer, "jwksUri": "https://idp.example.test/certs"}
    card, text = await fetch_card(await make_client(auth=auth))
    assert a2a_problems(card) == []
    assert card["securitySchemes"]["bearer"]["type"] == "http"
    assert card["security"] == [{"bearer": []}]
    assert "hunter2" not in text
    assert "idp.example.test" not in text


async def test_streaming_is_offered_only_when_chat_is_enabled(make_client: AppFactory) -> None:
    without, _ = await fetch_card(await make_client())
    assert without["capabilities"]["streaming"] is False
    assert "chat" not in skills(without)
    assert {tuple(skill["outputModes"]) for skill in without["skills"]} == {("application/json",)}
    model = {"baseUrl": "https://model.example.test/v1", "model": "some-model"}
    with_chat, _ = await fetch_card(
        await make_client(operations=["chat"], model=model, egress={"allowedHosts": ["model.example.test"]})
    )
    assert with_chat["capabilities"]["streaming"] is True
    assert list(skills(with_chat)) == ["chat"]
    assert skills(with_chat)["chat"]["outputModes"] == ["application/json", "text/event-stream"]
    assert a2a_problems(with_chat) == []
    Draft202012Validator.check_schema(skills(with_chat)["chat"]["inputSchema"])
    assert "messages" in skills(with_chat)["chat"]["inputSchema"]["properties"]
    # A model configured but chat not enabled: nothing streams.
    configured, _ = await fetch_card(await make_client(model=model, egress={"allowedHosts": ["model.example.test"]}))
    assert configured["capabilities"]["streaming"] is False


async def test_the_card_holds_no_secret_and_no_internal_address(
    aiohttp_client: Any, tmp_path: Path, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config full of things a stranger must not learn, the shared database's URL in the
    environment and the model's key in its variable: none of it is anywhere in the card."""
    directory = tmp_path / "canary-layout-d41c"
    model_host = "llm-canary-7c1.internal.example"
    monkeypatch.setenv("CANARY_MODEL_KEY_VAR", "sk-canary-model-key-0b9e")
    database = f"canary_db_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(postgres.url)
    try:
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    database_url = postgres.url.rsplit("/", 1)[0] + f"/{database}"
    config_file = make_layout(
        directory,
        operations=["chat", "ping", "process_document"],
        securityLevel="confidential",
        model={
            "baseUrl": f"https://{model_host}:8443/canary-gateway/v1",
            "model": "canary-model-name-5d2",
            "apiKeyEnv": "CANARY_MODEL_KEY_VAR",
            "caBundleFile": str(make_tls(tmp_path / "canary-model-ca").ca_file),
        },
        egress={"allowedHosts": [model_host, "*.canary-tools.internal.example"]},
        observability={"otlpEndpoint": "http://otel-canary.monitoring.svc.cluster.local:4318"},
        auth={"trustedProxies": ["10.123.45.0/24"], "issuer": "canary-issuer-a77", "audience": "canary-audience-e1"},
        audit={"file": str(tmp_path / "canary-audit-dir" / "audit.log"), "stdout": False},
        roles={"canary-role-q8": ["read", "execute"], "admin": ["read", "write", "execute", "admin"]},
        clearances={"canary-role-q8": "confidential", "admin": "restricted"},
        compliance={"frameworks": ["GDPR"]},
    )
    users = directory / "users"
    users.write_text(users.read_text() + hash_line("canary-user-3f9", ["canary-role-q8"], "canary-password-77") + "\n")
    settings = Settings.load(str(config_file), env={"DATABASE_URL": database_url})
    client: Client = await aiohttp_client(create_app(settings))
    assert client.app is not None

    card, text = await fetch_card(client)
    assert a2a_problems(card) == []
    assert list(skills(card)) == ["chat", "ping", "process_document"]
    head = await client.head(CARD)
    assert head.status == 200
    secrets = [
        model_host, "canary-gateway", "8443", "canary-model-name-5d2", "CANARY_MODEL_KEY_VAR",
        "sk-canary-model-key-0b9e", "canary-model-ca", "canary-tools", "otel-canary", "4318", "10.123.45",
        "canary-issuer-a77", "canary-audience-e1", "canary-audit-dir", "canary-layout-d41c", str(tmp_path),
        "canary-role-q8", "canary-user-3f9", "canary-password-77", database, postgres.password,
        f":{postgres.port}", "postgresql", "DATABASE_URL", "/var/lib/agent", "/etc/agent",
    ]  # fmt: skip
    # The key ring: every key file's name (its key id) and its content.
    for key_file in (directory / "keys").iterdir():
        secrets.append(key_file.name)
        secrets += [line for line in key_file.read_text().splitlines() if len(line) >= 8]
    # Every user's entry: the password hashes, and the names (short ones as whole words: "ada" is
    # in "metadata").
    words = set(re.findall(r"[A-Za-z0-9_.@-]+", text))
    for line in users.read_text().splitlines():
        name, _, rest = line.partition(":")
        assert name not in words, name
        secrets += [part for part in rest.split(":") if len(part) >= 16]
    leaked = [secret for secret in secrets if secret.lower() in text.lower()]
    assert leaked == [], f"the public card names {leaked}"


async def test_the_url_is_the_address_the_client_reached(make_client: AppFactory) -> None:
    client = await make_client()
    card, _ = await fetch_card(client, Host="agents.example.com")
    assert card["url"] == "http://agents.example.com"
    assert card["documentationUrl"] == "http://agents.example.com/openapi.json"
    # Forwarded headers from a peer that is no trusted proxy are the client's own words: ignored.
    card, _ = await fetch_card(
        client, Host="agents.example.com", **{"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    )
    assert card["url"] == "http://agents.example.com"

    behind_ingress = await make_client(auth={"trustedProxies": ["127.0.0.0/8", "::1/128"]})
    forwarded = {"X-Forwarded-Host": "agents.example.com", "X-Forwarded-Proto": "https"}
    card, _ = await fetch_card(behind_ingress, Host="support-bot.agents.svc:8080", **forwarded)
    assert card["url"] == "https://agents.example.com"
    # A list of hosts (whose hop wrote which is unclear) or a forwarded value that is no host is not believed.
    for host in ("a.example, b.example", "evil.example/path", "user@evil.example"):
        card, _ = await fetch_card(behind_ingress, Host="agents.example.com", **{"X-Forwarded-Host": host})
        assert card["url"] == "http://agents.example.com", host
    card, _ = await fetch_card(behind_ingress, Host="agents.example.com", **{"X-Forwarded-Proto": "javascript"})
    assert card["url"] == "http://agents.example.com"


async def test_a_host_that_is_no_host_is_refused_naming_the_header(make_client: AppFactory) -> None:
    client = await make_client()
    for host in ("evil.example/phish", "user:pw@agents.example.com", "agents.example.com:port", "a b", '"><script>'):
        response = await client.get(CARD, headers={"Host": host})
        body = await response.json()
        assert response.status == 400, (host, body)
        assert body["code"] == "invalid_host"
        assert body["message"].startswith("Host:")


async def test_without_a_host_header_the_card_is_refused_not_filled_with_the_pods_address(
    make_client: AppFactory,
) -> None:
    client = await make_client()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {CARD} HTTP/1.0\r\n\r\n".encode())  # HTTP/1.0 needs no Host
        await writer.drain()
        answer = (await reader.read()).decode()
    finally:
        writer.close()
    status_line, _, rest = answer.partition("\r\n")
    assert status_line.split()[1] == "400", answer
    assert "invalid_host" in rest
    assert client.host not in rest.split("\r\n\r\n", 1)[1]


async def test_conditional_requests_and_cache_headers(make_client: AppFactory) -> None:
    client = await make_client()
    first = await client.get(CARD)
    etag = first.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag), etag
    assert first.headers["Cache-Control"] == "public, max-age=300"
    assert "X-Forwarded-Host" in first.headers["Vary"]
    for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.get(CARD, headers={"If-None-Match": tag})
        assert again.status == 304, tag
        assert await again.read() == b""
        assert again.headers["ETag"] == etag
    assert (await client.get(CARD, headers={"If-None-Match": '"other"'})).status == 200
    # Another address is another card: its own tag, and the first one's does not match it.
    elsewhere = await client.get(CARD, headers={"Host": "agents.example.com", "If-None-Match": etag})
    assert elsewhere.status == 200
    assert elsewhere.headers["ETag"] != etag


async def test_replicas_of_one_config_serve_the_same_card_and_a_new_config_another(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Behind one Service every replica must give the same card and tag, or caches would flap."""
    config_file = make_layout(tmp_path / "agent")
    catalogue = {**BUILTINS, **MATRIX_OPERATIONS}
    first = await aiohttp_client(create_app(Settings.load(str(config_file)), catalogue))
    second = await aiohttp_client(create_app(Settings.load(str(config_file)), catalogue))
    host = {"Host": "agents.example.com"}
    a, b = await first.get(CARD, headers=host), await second.get(CARD, headers=host)
    assert await a.read() == await b.read()
    assert a.headers["ETag"] == b.headers["ETag"]
    changed = make_layout(tmp_path / "changed", operations=["ping"])
    other = await aiohttp_client(create_app(Settings.load(str(changed)), catalogue))
    card, _ = await fetch_card(other, **host)
    assert card["version"] != (await a.json())["version"]


async def test_head_is_served_and_other_methods_are_refused_without_asking_for_a_token(
    make_client: AppFactory,
) -> None:
    client = await make_client()
    get = await client.get(CARD)
    body = await get.read()
    head = await client.head(CARD)
    assert head.status == 200
    assert await head.read() == b""
    assert head.headers["ETag"] == get.headers["ETag"]
    assert int(head.headers["Content-Length"]) == len(body)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = await client.request(method, CARD, json={"name": "forged"})
        answer = await response.json()
        assert response.status == 405, (method, answer)
        assert answer["code"] == "method_not_allowed"
        assert "GET" in response.headers["Allow"]


async def test_card_requests_are_measured_under_their_own_route(make_client: AppFactory) -> None:
    """The operator's analysis can tell discovery from agent traffic: the card has its own route label."""
    client = await make_client()
    for _ in range(2):
        await client.get(CARD)
    measured = samples(await (await client.get("/metrics")).text())
    key = ("agent_http_requests_total", (("method", "GET"), ("route", CARD), ("status", "200")))
    assert measured[key] == 2

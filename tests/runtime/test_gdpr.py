"""GDPR: operations on personal data need consent for the stated purpose; the consent ledger is
the proof; export and erasure; the audit trail names subjects only by a hash."""

from __future__ import annotations

from agent_runtime.state import AUDIT
from tests.runtime.conftest import AppFactory, login

DOCUMENT = {"input": {"content": "mail jane@example.com", "format": "text"}}


async def test_consent_gates_personal_data_and_is_provable(make_client: AppFactory) -> None:
    client = await make_client(
        securityLevel="confidential", operations=["process_document"], compliance={"frameworks": ["GDPR"]}
    )
    operator = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    admin = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}

    unnamed = await client.post("/v1/operations/process_document", json=DOCUMENT, headers=operator)
    assert (unnamed.status, (await unnamed.json())["message"]) == (
        400,
        "subject: a string of 1 to 128 bytes is required",
    )
    request = {**DOCUMENT, "subject": "jane@example.com", "purpose": "support"}
    refused = await client.post("/v1/operations/process_document", json=request, headers=operator)
    assert (refused.status, (await refused.json())["code"]) == (403, "consent_required")

    granted = await client.post(
        "/v1/gdpr/consents",
        json={"subject": "jane@example.com", "purpose": "support", "granted": True, "evidence": "web form 42"},
        headers=operator,
    )
    assert granted.status == 201
    allowed = await client.post("/v1/operations/process_document", json=request, headers=operator)
    assert allowed.status == 200
    other_purpose = await client.post(
        "/v1/operations/process_document", json={**request, "purpose": "marketing"}, headers=operator
    )
    assert other_purpose.status == 403

    await client.post(
        "/v1/gdpr/consents",
        json={"subject": "jane@example.com", "purpose": "support", "granted": False},
        headers=operator,
    )
    withdrawn = await client.post("/v1/operations/process_document", json=request, headers=operator)
    assert withdrawn.status == 403

    proof = await (await client.get("/v1/gdpr/consents/jane@example.com", headers=operator)).json()
    assert proof["current"] == {"support": False}
    assert [(e["granted"], e["actor"], e["evidence"]) for e in proof["history"]] == [
        (True, "otto", "web form 42"),
        (False, "otto", ""),
    ]

    assert (await client.get("/v1/gdpr/subjects/jane@example.com/export", headers=operator)).status == 403  # admin only
    exported = await (await client.get("/v1/gdpr/subjects/jane@example.com/export", headers=admin)).json()
    assert len(exported["consents"]) == 2
    erased = await (await client.delete("/v1/gdpr/subjects/jane@example.com", headers=admin)).json()
    assert erased == {"erased": {"results": 0, "consents": 2}}
    assert (await (await client.get("/v1/gdpr/consents/jane@example.com", headers=operator)).json())["history"] == []

    trail = [record for record in client.app[AUDIT].recent]
    assert not any("jane@example.com" in str(record.get("details")) for record in trail)
    assert any(record["action"] == "erase_subject" for record in trail)


async def test_gdpr_endpoints_are_absent_without_gdpr(make_client: AppFactory) -> None:
    client = await make_client()
    headers = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    response = await client.post(
        "/v1/gdpr/consents", json={"subject": "x", "purpose": "y", "granted": True}, headers=headers
    )
    assert (response.status, (await response.json())["code"]) == (404, "gdpr_disabled")

"""SOX maker-checker: a financial operation waits for a second person; the requester cannot approve
it; an approval runs it once; every step is audited."""

from __future__ import annotations

from agent_runtime.state import AUDIT
from tests.runtime.conftest import AppFactory, login

REQUEST = {"input": {"data": [{"amount": 100}, {"amount": 250}]}}


async def test_maker_checker(make_client: AppFactory) -> None:
    client = await make_client(
        operations=["analyze_data"], compliance={"frameworks": ["SOX"], "financialOperations": ["analyze_data"]}
    )
    maker = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    checker = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}

    pending = await client.post("/v1/operations/analyze_data", json=REQUEST, headers=maker)
    assert pending.status == 202
    approval_id = (await pending.json())["approval_id"]
    listed = await (await client.get("/v1/approvals", headers=checker)).json()
    assert [(a["id"], a["requester"]) for a in listed["pending"]] == [(approval_id, "otto")]

    own = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=maker)
    assert (own.status, (await own.json())["code"]) == (403, "self_approval")

    approved = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker)
    body = await approved.json()
    assert approved.status == 200, body
    assert body["result"]["columns"]["amount"]["mean"] == 175
    assert body["actor"] == "otto"

    again = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker)
    assert (again.status, (await again.json())["code"]) == (409, "already_decided")

    rejected_id = (await (await client.post("/v1/operations/analyze_data", json=REQUEST, headers=maker)).json())[
        "approval_id"
    ]
    rejected = await client.post(f"/v1/approvals/{rejected_id}", json={"decision": "reject"}, headers=checker)
    assert (await rejected.json())["status"] == "rejected"

    again_rejected = await client.post(f"/v1/approvals/{rejected_id}", json={"decision": "approve"}, headers=checker)
    assert (again_rejected.status, (await again_rejected.json())["message"]) == (
        409,
        "this approval is already rejected",
    )

    trail = [
        (r["action"], r["result"], r["actor"])
        for r in client.app[AUDIT].recent
        if r["action"] in ("analyze_data", "approve:analyze_data")
    ]
    assert trail == [
        ("analyze_data", "pending_approval", "otto"),
        ("approve:analyze_data", "denied", "otto"),
        ("analyze_data", "success", "ada"),
        ("approve:analyze_data", "failure", "ada"),  # the second decision is refused, and recorded
        ("analyze_data", "pending_approval", "otto"),
        ("analyze_data", "rejected", "ada"),
        ("approve:analyze_data", "failure", "ada"),
    ]
    conflict = next(r for r in client.app[AUDIT].recent if r["result"] == "failure")
    assert conflict["details"] == {
        "approval_id": approval_id,
        "requested_by": "otto",
        "decided_by": "ada",
        "reason": "already approved",
    }
    success = next(r for r in client.app[AUDIT].recent if r["result"] == "success" and r["action"] == "analyze_data")
    assert (success["details"]["requested_by"], success["details"]["decided_by"]) == ("otto", "ada")


async def test_without_sox_nothing_waits(make_client: AppFactory) -> None:
    client = await make_client(operations=["analyze_data"], compliance={"financialOperations": ["analyze_data"]})
    headers = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    response = await client.post("/v1/operations/analyze_data", json=REQUEST, headers=headers)
    assert response.status == 200


async def test_an_approval_is_refused_when_consent_was_withdrawn_meanwhile(make_client: AppFactory) -> None:
    """Consent is checked again when the approval runs, not only when it was requested."""
    client = await make_client(
        securityLevel="confidential",
        operations=["process_document"],
        compliance={"frameworks": ["GDPR", "SOX"], "financialOperations": ["process_document"]},
    )
    maker = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    checker = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    consent = {"subject": "jane@example.com", "purpose": "billing"}
    assert (await client.post("/v1/gdpr/consents", json={**consent, "granted": True}, headers=maker)).status == 201
    request = {"input": {"content": "invoice for jane@example.com"}, **consent}
    pending = await client.post("/v1/operations/process_document", json=request, headers=maker)
    assert pending.status == 202, await pending.text()
    approval_id = (await pending.json())["approval_id"]

    assert (await client.post("/v1/gdpr/consents", json={**consent, "granted": False}, headers=maker)).status == 201
    refused = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker)
    assert (refused.status, (await refused.json())["code"]) == (403, "consent_required")

    # Refused for good: a later grant does not revive a request made under the withdrawn one.
    assert (await client.post("/v1/gdpr/consents", json={**consent, "granted": True}, headers=maker)).status == 201
    again = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker)
    assert (again.status, (await again.json())["message"]) == (409, "this approval is already refused")
    assert (await (await client.get("/v1/approvals", headers=checker)).json())["pending"] == []

    records = [r for r in client.app[AUDIT].recent if r["action"] in ("process_document", "approve:process_document")]
    assert [(r["action"], r["result"]) for r in records] == [
        ("process_document", "pending_approval"),
        ("approve:process_document", "denied"),
        ("approve:process_document", "failure"),
    ]
    assert records[1]["details"]["reason"] == "consent withdrawn"
    assert "jane@example.com" not in str(records)

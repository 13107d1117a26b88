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

    trail = [
        (r["action"], r["result"], r["actor"])
        for r in client.app[AUDIT].recent
        if r["action"] in ("analyze_data", "approve:analyze_data")
    ]
    assert trail == [
        ("analyze_data", "pending_approval", "otto"),
        ("approve:analyze_data", "denied", "otto"),
        ("analyze_data", "success", "ada"),
        ("analyze_data", "pending_approval", "otto"),
        ("analyze_data", "rejected", "ada"),
    ]
    success = next(r for r in client.app[AUDIT].recent if r["result"] == "success" and r["action"] == "analyze_data")
    assert (success["details"]["requested_by"], success["details"]["decided_by"]) == ("otto", "ada")


async def test_without_sox_nothing_waits(make_client: AppFactory) -> None:
    client = await make_client(operations=["analyze_data"], compliance={"financialOperations": ["analyze_data"]})
    headers = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    response = await client.post("/v1/operations/analyze_data", json=REQUEST, headers=headers)
    assert response.status == 200

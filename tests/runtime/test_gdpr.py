"""GDPR: operations on personal data need consent for the stated purpose; the consent ledger is
the proof; export and erasure; the audit trail names subjects only by a hash."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import new_key_files, write_key_files
from agent_runtime.app import create_app
from agent_runtime.settings import Settings
from agent_runtime.state import AUDIT
from tests.runtime.conftest import AppFactory, login, make_layout

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
    assert erased == {"erased": {"results": 0, "consents": 2, "approvals": 0}}
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


async def test_export_and_erasure_cover_approvals_and_reports(make_client: AppFactory) -> None:
    client = await make_client(
        securityLevel="confidential",
        operations=["process_document", "generate_report"],
        compliance={"frameworks": ["GDPR", "SOX"], "financialOperations": ["process_document"]},
    )
    operator = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    admin = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    consent = {"subject": "jane@example.com", "purpose": "billing"}
    await client.post("/v1/gdpr/consents", json={**consent, "granted": True}, headers=operator)
    pending = await client.post(
        "/v1/operations/process_document", json={"input": {"content": "invoice 77"}, **consent}, headers=operator
    )
    approval_id = (await pending.json())["approval_id"]
    report = {"title": "Jane's invoices", "subject": "jane@example.com", "analysis": {"data": [{"eur": 5}, {"eur": 7}]}}
    made = await client.post("/v1/operations/generate_report", json={"input": report}, headers=operator)
    assert made.status == 200, await made.text()
    report_id = (await made.json())["result"]["report_id"]
    other = await client.post(
        "/v1/operations/generate_report", json={"input": {**report, "subject": "john@example.com"}}, headers=operator
    )
    assert other.status == 200

    exported = await (await client.get("/v1/gdpr/subjects/jane@example.com/export", headers=admin)).json()
    assert [(a["id"], a["operation"], a["purpose"], a["input"]) for a in exported["approvals"]] == [
        (approval_id, "process_document", "billing", {"content": "invoice 77"})
    ]
    assert [(r["id"], r["content"]["title"]) for r in exported["results"]] == [(report_id, "Jane's invoices")]

    erased = await (await client.delete("/v1/gdpr/subjects/jane@example.com", headers=admin)).json()
    assert erased == {"erased": {"results": 1, "consents": 1, "approvals": 1}}
    after = await (await client.get("/v1/gdpr/subjects/jane@example.com/export", headers=admin)).json()
    assert (after["approvals"], after["results"], after["consents"]) == ([], [], [])
    # The erased request can no longer run, and the report is gone; the other subject's stays.
    approve = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=admin)
    assert (approve.status, (await approve.json())["message"]) == (409, "this approval is already erased")
    assert (await client.get(f"/v1/reports/{report_id}", headers=operator)).status == 404
    kept = (await other.json())["result"]["download"]["json"]
    assert (await client.get(kept, headers=operator)).status == 200


async def _pseudonym_in_trail(aiohttp_client: Any, config_file: Path, subject: str) -> str:
    client = await aiohttp_client(create_app(Settings.load(str(config_file))))
    try:
        headers = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
        recorded = await client.post(
            "/v1/gdpr/consents", json={"subject": subject, "purpose": "support", "granted": True}, headers=headers
        )
        assert recorded.status == 201
        record = next(r for r in reversed(client.app[AUDIT].recent) if r["action"] == "consent_granted")
        pseudonym: str = record["details"]["subject"]
        return pseudonym
    finally:
        await client.close()


async def test_pseudonyms_are_keyed_stable_and_change_with_the_key(aiohttp_client: Any, tmp_path: Path) -> None:
    """A list of candidate names hashed without the agent's key does not re-identify anyone."""
    config_file = make_layout(tmp_path / "agent", compliance={"frameworks": ["GDPR"]})
    subject = "jane@example.com"
    first = await _pseudonym_in_trail(aiohttp_client, config_file, subject)
    candidates = {
        hashlib.sha256(subject.encode()).hexdigest(),
        hashlib.sha256(subject.encode()).hexdigest()[:16],
        hashlib.sha256(subject.lower().encode()).hexdigest()[:32],
    }
    assert first not in candidates
    assert not any(first in candidate or candidate in first for candidate in candidates)
    assert len(first) == 32
    assert await _pseudonym_in_trail(aiohttp_client, config_file, subject) == first  # stable across restarts
    assert await _pseudonym_in_trail(aiohttp_client, config_file, "john@example.com") != first

    keys = tmp_path / "agent" / "keys"
    previous = {path.name: path.read_bytes() for path in keys.iterdir()}
    write_key_files(keys, new_key_files(SigningAlgorithm.EDDSA, previous))  # a key rotation
    assert await _pseudonym_in_trail(aiohttp_client, config_file, subject) != first

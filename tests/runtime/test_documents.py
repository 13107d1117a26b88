"""process_document: text extraction, entities, PII and PHI, over HTTP with its level."""

from __future__ import annotations

from agent_runtime.operations.documents import DocumentFormat, DocumentInput, process
from tests.runtime.conftest import AppFactory, login

NOTE = """<html><head><style>p {color: red}</style><script>var ssn = "999-99-9999";</script></head>
<body><h1>Discharge summary</h1>
<p>Patient Jane Roe (MRN: 00123456) was seen at St. Mary Hospital on March 3, 2026 for E11.9.</p>
<p>Contact: jane.roe@example.com or +1 415-555-0132. Card 4111 1111 1111 1111 on file.</p>
<p>Invoice from Acme Health Inc. for $1,250.00 is due 2026-04-01.</p></body></html>"""


def test_html_document_entities_pii_and_phi() -> None:
    result = process(DocumentInput(content=NOTE, format=DocumentFormat.HTML))
    entities = result["entities"]
    assert entities["money"] == ["$1,250.00"]
    assert entities["dates"] == ["March 3, 2026", "2026-04-01"]
    assert entities["emails"] == ["jane.roe@example.com"]
    assert entities["phones"] == ["+1 415-555-0132"]
    assert "Acme Health Inc" in entities["organisations"]
    assert "St. Mary Hospital" in entities["organisations"] or "Mary Hospital" in entities["organisations"]
    pii_types = {item["type"] for item in result["pii"]}
    assert pii_types == {"email", "phone", "payment_card"}  # the script's SSN is not visible text
    phi_types = {item["type"] for item in result["phi"]}
    assert {"medical_record_number", "diagnosis_code", "email_in_health_context"} <= phi_types
    assert result["contains_phi"] is True
    text = result["text"]
    assert "jane.roe@example.com" not in text
    assert "4111" not in text
    assert "00123456" not in text
    assert "[EMAIL]" in text
    assert "var ssn" not in text


def test_markdown_and_plain_text() -> None:
    markdown = "# Q3 report\n\n**Revenue** was [USD](https://x) 2,000,000 USD, see [notes](https://example.com).\n"
    result = process(DocumentInput(content=markdown, format=DocumentFormat.MARKDOWN))
    assert result["text"].startswith("Q3 report")
    assert "**" not in result["text"]
    assert "https://example.com" not in result["text"]
    assert result["entities"]["money"] == ["2,000,000 USD"]
    clean = process(DocumentInput(content="No personal data in here."))
    assert (clean["contains_pii"], clean["contains_phi"]) == (False, False)
    assert process(DocumentInput(content="card 4111 1111 1111 1112"))["pii"] == []  # fails Luhn


async def test_over_http_needs_confidential_clearance(make_client: AppFactory) -> None:
    client = await make_client(securityLevel="confidential", extra_operations={}, operations=["process_document"])
    viewer = (await login(client, "vic"))["access_token"]
    analyst = (await login(client, "ana"))["access_token"]
    body = {"input": {"content": "call +1 415-555-0132", "format": "text"}}
    denied = await client.post(
        "/v1/operations/process_document", json=body, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert denied.status == 403  # a viewer's clearance is internal
    allowed = await client.post(
        "/v1/operations/process_document", json=body, headers={"Authorization": f"Bearer {analyst}"}
    )
    assert allowed.status == 200
    assert (await allowed.json())["result"]["text"] == "call [PHONE]"

"""process_document: text extraction, entities, PII and PHI, over HTTP with its level; its detectors
find what the patterns they replace found, in time linear in the text."""

from __future__ import annotations

import random
import re
import time

import pytest

from agent_runtime.operations.documents import DocumentFormat, DocumentInput, process, to_text
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


# The patterns the linear detectors replace: right, but quadratic (or worse) on long runs, so
# only ever given short texts here, as the reference for what the detectors must still find.
QUADRATIC_MONEY = re.compile(
    r"(?:[$€£¥]\s?\d{1,3}(?:[,\d{3}])*(?:\.\d+)?(?:\s?(?:million|billion|k|m|bn))?|\b\d[\d,]*(?:\.\d+)?\s?(?:USD|EUR|GBP|JPY|dollars|euros|pounds)\b)"
)
QUADRATIC_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
QUADRATIC_ORGANISATION = re.compile(
    r"\b(?:[A-Z][A-Za-z&'-]+\s){0,4}(?:Inc|Corp|Corporation|LLC|Ltd|GmbH|AG|SA|plc|Bank|University|Hospital|Clinic|Group)\b\.?"
)
QUADRATIC_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
WORDS = [
    "1", "12", "1,000", "$5", "$1,250.00", "€3m", "£2 million", "2,000,000 USD", "1.5 EUR", "USD", "Inc", "Inc.",
    "Bank", "plc", "Acme", "Acme-Health", "AT&T", "O'Neil", "x-Acme", "jane.roe@example.com", "..j.doe@ex.org",
    "a@b.c", "a@b.co.uk", "+1 415-555-0132", "(415) 555-0132", "4111 1111 1111 1111", "123-45-6789", "10.0.0.1",
    "MRN: 00123456", "E11.9", "patient", "member id ABC123456", "March 3, 2026", "2026-04-01", "St.", "Mary",
    "Hospital", "University", "of", "the", "Group", "GmbH", "k", "m", "é", "naïve", "Zürich", "[link](http://x)",
    "**bold**", "# Title", "- item", "1. first", "`code`", "![image](i.png)",
]  # fmt: skip
SEPARATORS = (" ", " ", "\n", ", ", ". ", "; ", "\n\n")


def test_on_text_of_whole_words_the_detectors_find_what_the_quadratic_patterns_found() -> None:
    rng = random.Random(20261201)
    for _ in range(3000):
        text = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 14)))
        entities = process(DocumentInput(content=text))["entities"]
        assert entities["money"] == [m.group().strip() for m in QUADRATIC_MONEY.finditer(text)], text
        assert entities["emails"] == [m.group() for m in QUADRATIC_EMAIL.finditer(text)], text
        expected = sorted({m.group().strip().rstrip(".") for m in QUADRATIC_ORGANISATION.finditer(text)})
        assert entities["organisations"] == expected, text
        links_as_text = QUADRATIC_LINK.sub(r"\1", text)
        assert to_text(text, DocumentFormat.MARKDOWN) == to_text(links_as_text, DocumentFormat.MARKDOWN), text


def test_names_glued_by_a_dash_ampersand_or_apostrophe_are_still_found() -> None:
    text = "Paid x-Acme Inc, AT&T Inc. and the Foo-Bank; O'Neil Group; 'plc"
    assert process(DocumentInput(content=text))["entities"]["organisations"] == [
        "AT&T Inc",
        "Acme Inc",
        "Bank",
        "O'Neil Group",
        "plc",
    ]


def test_html_text_is_what_a_reader_sees() -> None:
    html = (
        "<!doctype html><html><head><title>T</title><style>p {}</style></head><body>"
        "<script type='x'>if (a < b) { hide(); }</ script >"
        "<p title='a > b'>One &amp; two &#65;&#x42; &#" + "1" * 5000 + ";</p><!-- a comment -->"
        "<template><p>hidden</p></template><div>Three<br/>four</div><![CDATA[ x > y ]]>"
        "<SCRIPT>never closed"
    )
    # As html.parser read it (a block inside a template still breaks the line), but linear.
    assert to_text(html, DocumentFormat.HTML) == "T\nOne & two AB \ufffd\n\nThree\nfour"
    # A construct left open at the end is text, as html.parser reads it.
    assert to_text("x < y and <b>bold</b> <!-- open", DocumentFormat.HTML) == "x < y and bold <!-- open"
    assert to_text("a <a title='open", DocumentFormat.HTML) == "a <a title='open"


def _seconds(content: str, kind: DocumentFormat) -> float:
    """The fastest of three runs: the least disturbed by whatever else the machine is doing."""
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        process(DocumentInput(content=content, format=kind))
        runs.append(time.perf_counter() - started)
    return min(runs)


@pytest.mark.parametrize(
    ("unit", "kind"),
    [
        ("1,", DocumentFormat.TEXT),
        ("1.", DocumentFormat.TEXT),
        ("a@", DocumentFormat.TEXT),
        ("a.", DocumentFormat.TEXT),
        ("A-", DocumentFormat.TEXT),
        ("[", DocumentFormat.MARKDOWN),
        ("[](", DocumentFormat.MARKDOWN),
        ("<a ", DocumentFormat.HTML),
        ("<!--", DocumentFormat.HTML),
        ("<a b='", DocumentFormat.HTML),
    ],
)
def test_four_times_the_text_takes_about_four_times_as_long(unit: str, kind: DocumentFormat) -> None:
    """Linear: 4x the text takes about 4x the time, where the patterns replaced took 16x or more.
    (A ratio, not a speed: it holds on a slow machine as on a fast one.)"""
    small = _seconds(unit * (25_000 // len(unit)), kind)
    large = _seconds(unit * (100_000 // len(unit)), kind)
    assert large / small < 8, f"{large:.3f}s for 100k characters, {small:.3f}s for 25k"

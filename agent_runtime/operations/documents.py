"""process_document: text out of plain text, Markdown or HTML; entities (money, dates, e-mails,
phone numbers, organisations); PII and PHI detection. Standard library only (html.parser, re)."""

from __future__ import annotations

import re
from enum import StrEnum
from html.parser import HTMLParser
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_CHARACTERS = 5_000_000


class DocumentFormat(StrEnum):
    TEXT = "text"
    MARKDOWN = "markdown"
    HTML = "html"


class DocumentInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(max_length=MAX_CHARACTERS)
    format: DocumentFormat = DocumentFormat.TEXT


class _TextOfHtml(HTMLParser):
    """Visible text of an HTML document: script and style contents are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "template"):
            self._hidden += 1
        elif tag in ("p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "template") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def to_text(content: str, kind: DocumentFormat) -> str:
    if kind is DocumentFormat.HTML:
        parser = _TextOfHtml()
        parser.feed(content)
        parser.close()
        text = "".join(parser.parts)
    elif kind is DocumentFormat.MARKDOWN:
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", content)  # links and images keep their text
        text = re.sub(r"^\s{0,3}(#{1,6}|>|[-*+]|\d+\.)\s+", "", text, flags=re.MULTILINE)
        text = re.sub(r"(\*\*|__|\*|_|`{1,3}|~~)", "", text)
    else:
        text = content
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()


MONEY = re.compile(
    r"(?:[$€£¥]\s?\d{1,3}(?:[,\d{3}])*(?:\.\d+)?(?:\s?(?:million|billion|k|m|bn))?|\b\d[\d,]*(?:\.\d+)?\s?(?:USD|EUR|GBP|JPY|dollars|euros|pounds)\b)"
)
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
DATE = re.compile(
    rf"\b(?:\d{{4}}-\d{{2}}-\d{{2}}|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|(?:{MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}|\d{{1,2}} (?:{MONTHS}) \d{{4}})\b"
)
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
PHONE = re.compile(r"(?<![\w-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w-])")
ORGANISATION = re.compile(
    r"\b(?:[A-Z][A-Za-z&'-]+\s){0,4}(?:Inc|Corp|Corporation|LLC|Ltd|GmbH|AG|SA|plc|Bank|University|Hospital|Clinic|Group)\b\.?"
)
SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")
IP_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
MRN = re.compile(r"\b(?:MRN|Medical Record(?: Number)?)[:#\s]*\d{5,12}\b", re.IGNORECASE)
ICD10 = re.compile(r"\b[A-TV-Z]\d{2}\.\d{1,4}\b")
HEALTH_PLAN = re.compile(r"\b(?:member|policy|health plan)\s*(?:id|number|no\.?)[:#\s]*[A-Z0-9]{6,15}\b", re.IGNORECASE)
HEALTH_TERMS = re.compile(
    r"\b(?:patient|diagnos\w*|prescri\w*|treatment|symptom\w*|medical|clinical|hospital|disease|therapy)\b",
    re.IGNORECASE,
)


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _phones(text: str) -> list[re.Match[str]]:
    """Phone-shaped matches that are not part of a longer digit run (a card or account number)."""
    runs = [(m.start(), m.end()) for m in CARD.finditer(text) if len(re.sub(r"\D", "", m.group())) >= 13]
    return [m for m in PHONE.finditer(text) if not any(start <= m.start() < end for start, end in runs)]


def _spans(pattern: re.Pattern[str], text: str, kind: str) -> list[dict[str, Any]]:
    return [
        {"type": kind, "text": m.group().strip(), "start": m.start(), "end": m.end()} for m in pattern.finditer(text)
    ]


def find_pii(text: str) -> list[dict[str, Any]]:
    """Personal data that identifies someone: e-mail, phone, SSN, payment card (Luhn-valid), IP."""
    found = _spans(EMAIL, text, "email") + _spans(SSN, text, "ssn")
    found += [{"type": "phone", "text": m.group().strip(), "start": m.start(), "end": m.end()} for m in _phones(text)]
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            found.append(
                {"type": "payment_card", "text": match.group().strip(), "start": match.start(), "end": match.end()}
            )
    found += [
        s for s in _spans(IP_ADDRESS, text, "ip_address") if all(int(part) <= 255 for part in s["text"].split("."))
    ]
    return sorted(found, key=lambda item: item["start"])


def find_phi(text: str, pii: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Protected health information: medical record and health plan numbers, diagnosis codes, and
    personal identifiers in a text about health (HIPAA's identifiers plus health context)."""
    found = (
        _spans(MRN, text, "medical_record_number")
        + _spans(HEALTH_PLAN, text, "health_plan_id")
        + _spans(ICD10, text, "diagnosis_code")
    )
    if HEALTH_TERMS.search(text):
        found += [{**item, "type": f"{item['type']}_in_health_context"} for item in pii]
    return sorted(found, key=lambda item: item["start"])


def redact(text: str, findings: list[dict[str, Any]]) -> str:
    """The text with every finding replaced by [TYPE]; overlapping findings merge."""
    result, position = [], 0
    for item in sorted(findings, key=lambda f: (f["start"], -f["end"])):
        if item["start"] < position:
            continue
        result.append(text[position : item["start"]])
        result.append(f"[{item['type'].upper()}]")
        position = item["end"]
    result.append(text[position:])
    return "".join(result)


def process(request: DocumentInput) -> dict[str, Any]:
    text = to_text(request.content, request.format)
    pii = find_pii(text)
    phi = find_phi(text, pii)
    entities = {
        "money": [m.group().strip() for m in MONEY.finditer(text)],
        "dates": [m.group() for m in DATE.finditer(text)],
        "emails": [m.group() for m in EMAIL.finditer(text)],
        "phones": [m.group().strip() for m in _phones(text)],
        "organisations": sorted({m.group().strip().rstrip(".") for m in ORGANISATION.finditer(text)}),
    }
    return {
        "text": redact(text, pii + phi),
        "characters": len(text),
        "entities": entities,
        "pii": [{k: v for k, v in item.items() if k != "text"} for item in pii],
        "phi": [{k: v for k, v in item.items() if k != "text"} for item in phi],
        "contains_pii": bool(pii),
        "contains_phi": bool(phi),
    }


async def process_document(request: DocumentInput) -> dict[str, Any]:
    return process(request)

"""process_document: text out of plain text, Markdown or HTML; entities (money, dates, e-mails,
phone numbers, organisations); PII and PHI detection. Standard library only (re, html), and linear
time in the input whatever it holds."""

from __future__ import annotations

import bisect
import html
import re
from enum import StrEnum
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


_HIDDEN = frozenset({"script", "style", "template"})
_RAW_TEXT = frozenset({"script", "style"})  # their content is text up to their end tag, not markup
_BLOCKS = frozenset({"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})
# One token of HTML at a time, each alternative linear: every repetition is possessive and its
# alternatives start with different characters, so nothing is scanned twice. A construct left open
# at the end (a comment, a tag, a quoted attribute value) runs to the end and is then read as text,
# as html.parser does; html.parser itself is not used, as its handling of unclosed tags is
# quadratic ("<a " * 7000 took 5 s) on the Python versions the image ships.
_HTML_TOKEN = re.compile(
    r"(?P<text>[^<]++)"
    r"|<!--(?:[^-]++|-(?!->))*+(?P<comment_end>-->)?"
    r"|<!\[(?:[^\]]++|\](?!\s*+\]\s*+>))*+(?P<section_end>\]\s*+\]\s*+>)?"  # <![CDATA[ ... ]]>
    r"|</\s*+(?P<end>[A-Za-z][^\t\n\r\f />\x00]*+)?[^>]*+(?P<end_close>>)?"
    r"|<[!?][^>]*+(?P<declaration_end>>)?"
    r"|<(?P<start>[A-Za-z][^\t\n\r\f />\x00]*+)"
    r"(?:[^>\"'=]++|=\s*+(?:\"[^\"]*+\"?|'[^']*+'?)?+|[\"'])*+(?P<start_close>>)?"
    r"|<"
)
# A decimal character reference of more than seven digits is beyond Unicode (U+10FFFF is 1114111);
# html.unescape would turn its digits into an int, which fails beyond 4300 of them.
_LONG_DECIMAL_REFERENCE = re.compile(r"&#([0-9]{8,}+)")


def _unescape(text: str) -> str:
    if "&" not in text:
        return text

    def shortened(match: re.Match[str]) -> str:
        digits = match.group(1).lstrip("0") or "0"
        return "&#" + (digits if len(digits) <= 7 else "1114112")  # still beyond Unicode: U+FFFD

    return html.unescape(_LONG_DECIMAL_REFERENCE.sub(shortened, text))


def html_text(content: str) -> str:
    """Visible text of an HTML document: tags, comments and declarations dropped, script, style
    and template contents hidden, a line break for each block element, character references decoded."""
    parts: list[str] = []
    hidden = 0
    position, length = 0, len(content)
    while position < length:
        token = _HTML_TOKEN.match(content, position)
        if token is None:  # never: "<" and "[^<]++" cover every character
            break
        position = token.end()
        kind = token.lastgroup
        if token.group("text") is not None or kind is None:
            if not hidden:
                parts.append(_unescape(token.group()))
        elif kind in ("comment_end", "section_end", "end_close", "declaration_end", "start_close"):
            if kind == "end_close" and (name := (token.group("end") or "").lower()) in _HIDDEN and hidden:
                hidden -= 1
            elif kind == "start_close":
                name = token.group("start").lower()
                if name in _BLOCKS:
                    parts.append("\n")
                elif name in _HIDDEN and not token.group().endswith("/>"):
                    hidden += 1
                    if name in _RAW_TEXT:
                        closing = re.compile(rf"</\s*+{name}\s*+>", re.IGNORECASE).search(content, position)
                        # Its end tag (handled as the next token), or nothing more: all of it hidden.
                        position = closing.start() if closing is not None else length
        elif not hidden:  # left open at the end: text
            parts.append(_unescape(token.group()))
    return "".join(parts)


def to_text(content: str, kind: DocumentFormat) -> str:
    if kind is DocumentFormat.HTML:
        text = html_text(content)
    elif kind is DocumentFormat.MARKDOWN:
        # Links and images keep their text. Neither part runs past a bracket or parenthesis of its
        # own kind, so an unclosed "[" or "(" is scanned once, not once per "[" before it.
        text = re.sub(r"!?\[([^\[\]]*+)\]\([^()]*+\)", r"\1", content)
        text = re.sub(r"^\s{0,3}(#{1,6}|>|[-*+]|\d++\.)\s+", "", text, flags=re.MULTILINE)
        text = re.sub(r"(\*\*|__|\*|_|`{1,3}|~~)", "", text)
    else:
        text = content
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()


# Every detector below runs in time linear in the text, whatever the text. A pattern is only tried
# where it can start (a lookbehind rejects the inside of a run in one step), its runs are possessive
# (*+, ++: never given back, so a failed attempt costs its length once) and its other repetitions
# are bounded; so no character is scanned more than a constant number of times. (The patterns they
# replace took seconds on "1," * 6000: each start inside a long run rescanned the rest of it.)
MONEY = re.compile(
    # A currency sign, then the amount as far as it goes.
    r"(?P<signed>[$€£¥]\s?\d[\d,{}]*+(?:\.\d++)?+(?:\s?(?:million|billion|k|m|bn))?+)"
    # An amount, then its currency. Tried once per run of digits and commas: from the run's start,
    # or from its first digit after a comma when the run is glued to a word ("Total1,000").
    r"|(?<![\d,])(?:(?<!\w),*+|(?>[\d,]*?,(?=\d)))"
    r"(?P<amount>\d[\d,]*+(?:\.\d++)?+\s?+(?:USD|EUR|GBP|JPY|dollars|euros|pounds)\b)"
)
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
DATE = re.compile(
    rf"\b(?:\d{{4}}-\d{{2}}-\d{{2}}|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|(?:{MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}|\d{{1,2}} (?:{MONTHS}) \d{{4}})\b"
)
# The local part is its whole run of allowed characters (leading dots and signs dropped); the
# domain at most 253 characters and the top-level label at most 63 (DNS's own limits).
EMAIL = re.compile(
    r"(?<![\w.%+-])[.%+-]*+(?P<email>[A-Za-z0-9_][A-Za-z0-9._%+-]*+@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}\b)"
)
PHONE = re.compile(r"(?<![\w-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w-])")
_FORMS = "Inc|Corp|Corporation|LLC|Ltd|GmbH|AG|SA|plc|Bank|University|Hospital|Clinic|Group"
ORGANISATION = re.compile(
    # Up to four capitalised words, then the legal form or kind. Tried once per run of letters,
    # dashes, ampersands and apostrophes: from its first letter, or from its first capital after a
    # dash, ampersand or apostrophe ("x-Acme Inc"); a word runs to the end of its run, so a later
    # start in the same run would only find the same words.
    rf"(?<![A-Za-z&'-])(?:(?<!\w)[&'-]*+|(?>[A-Za-z&'-]*?[&'-](?=[A-Z])))"
    rf"(?P<org>(?:[A-Z][A-Za-z&'-]++\s){{0,4}}(?:{_FORMS})\b\.?)"
    # Or the form alone, inside such a run ("Foo-Inc").
    rf"|(?<=[&'-])(?P<form>(?:{_FORMS})\b\.?)"
)
SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")
IP_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
MRN = re.compile(r"\b(?:MRN|Medical Record(?: Number)?)[:#\s]*+\d{5,12}\b", re.IGNORECASE)
ICD10 = re.compile(r"\b[A-TV-Z]\d{2}\.\d{1,4}\b")
HEALTH_PLAN = re.compile(
    r"\b(?:member|policy|health plan)\s*+(?:id|number|no\.?)[:#\s]*+[A-Z0-9]{6,15}\b", re.IGNORECASE
)
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
    starts = [start for start, _ in runs]  # sorted and disjoint: finditer's matches do not overlap

    def in_a_run(position: int) -> bool:
        index = bisect.bisect_right(starts, position) - 1
        return index >= 0 and position < runs[index][1]

    return [m for m in PHONE.finditer(text) if not in_a_run(m.start())]


def _spans(pattern: re.Pattern[str], text: str, kind: str, group: int | str = 0) -> list[dict[str, Any]]:
    return [
        {"type": kind, "text": m.group(group).strip(), "start": m.start(group), "end": m.end(group)}
        for m in pattern.finditer(text)
    ]


def find_pii(text: str) -> list[dict[str, Any]]:
    """Personal data that identifies someone: e-mail, phone, SSN, payment card (Luhn-valid), IP."""
    found = _spans(EMAIL, text, "email", "email") + _spans(SSN, text, "ssn")
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
        "money": [(m.group("signed") or m.group("amount")).strip() for m in MONEY.finditer(text)],
        "dates": [m.group() for m in DATE.finditer(text)],
        # The same matches as the PII's (in order), not found a second time.
        "emails": [item["text"] for item in pii if item["type"] == "email"],
        "phones": [item["text"] for item in pii if item["type"] == "phone"],
        "organisations": sorted(
            {(m.group("org") or m.group("form")).strip().rstrip(".") for m in ORGANISATION.finditer(text)}
        ),
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

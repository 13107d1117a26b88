"""The operations the runtime ships: one table, read by both sides.

The runtime attaches a handler and an input model to each entry; the operator refuses (Stalled)
an agent that enables a name outside this table. A plugin operation from a custom image is not
in it (see the README's known limits).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_contract.config import Permission, SecurityLevel


@dataclass(frozen=True)
class OperationInfo:
    """What an operation needs, independent of how it is implemented."""

    name: str
    permission: Permission
    level: SecurityLevel  # the most sensitive data it may touch; a caller's clearance must cover it
    description: str
    personal_data: bool = False  # with GDPR, needs the subject's consent for the stated purpose
    needs_model: bool = False  # registered only when the runtime config has a model


PING = OperationInfo("ping", Permission.EXECUTE, SecurityLevel.PUBLIC, "Answers pong: a no-op for smoke tests.")
ANALYZE_DATA = OperationInfo(
    "analyze_data",
    Permission.EXECUTE,
    SecurityLevel.INTERNAL,
    "Descriptive statistics, quartiles, correlation and outliers of numeric columns.",
)
GENERATE_REPORT = OperationInfo(
    "generate_report",
    Permission.EXECUTE,
    SecurityLevel.INTERNAL,
    "A Markdown and HTML report of an analysis, stored and downloadable by id.",
)
PROCESS_DOCUMENT = OperationInfo(
    "process_document",
    Permission.EXECUTE,
    SecurityLevel.CONFIDENTIAL,
    "Text of a plain, Markdown or HTML document, its entities, and PII/PHI found (redacted in the text).",
    personal_data=True,
)
CHAT = OperationInfo(
    "chat",
    Permission.EXECUTE,
    SecurityLevel.CONFIDENTIAL,
    "A chat completion from the configured model, with personal data redacted before sending.",
    personal_data=True,
    needs_model=True,
)

BUILTIN_OPERATIONS: dict[str, OperationInfo] = {
    info.name: info for info in (PING, ANALYZE_DATA, GENERATE_REPORT, PROCESS_DOCUMENT, CHAT)
}

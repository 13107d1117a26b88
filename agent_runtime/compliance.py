"""The compliance routes: the audit trail (admin), GDPR consents, export and erasure, SOX
maker-checker approvals; and the retention purge."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from agent_contract.config import ComplianceFramework, Permission, SecurityLevel
from agent_runtime.api import ApiError, audit, authorize, pseudonym, read_json_object, string_field
from agent_runtime.limits import CALLER
from agent_runtime.operation_routes import admit_tokens, execute, operation_response, validated_input
from agent_runtime.routing import ERROR, Body, QueryParameter, Reply, Route, Schema
from agent_runtime.sharedstate import StateUnavailableError
from agent_runtime.state import AUDIT, CONFIG, REGISTRY, REVOKED, STORE, THROTTLE

log = logging.getLogger("agent_runtime")

# --- audit --------------------------------------------------------------------------------------------


async def audit_query(request: web.Request) -> web.Response:
    await authorize(request, Permission.ADMIN, SecurityLevel.PUBLIC, "read_audit")
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        raise ApiError(400, "invalid_query", "limit must be a number") from None
    actor, kind = request.query.get("actor"), request.query.get("type")
    records = [
        r
        for r in reversed(request.app[AUDIT].recent)
        if (actor is None or r.get("actor") == actor) and (kind is None or r.get("type") == kind)
    ][:limit]
    await audit(request, type="admin", action="read_audit", result="success", details={"returned": len(records)})
    return web.json_response({"records": records})


async def retention_loop(app: web.Application, every_seconds: float = 3600.0) -> None:
    """Purges stored results older than retentionDays, hourly, each purge audited; and expired
    revocations and forgotten throttle counters. A database that cannot be reached is tried
    again a minute later: the loop must outlive an outage."""
    while True:
        try:
            removed = await app[STORE].purge_older_than(app[CONFIG].compliance.retention_days)
            if removed:  # recorded before anything else can fail: a purge is never unaudited
                await app[AUDIT].record(
                    type="admin", action="retention_purge", result="success", details={"removed": removed}
                )
            await app[REVOKED].purge_expired()
            await app[THROTTLE].purge_forgotten()
        except StateUnavailableError as unavailable:
            log.warning("retention postponed: %s", unavailable)
            await asyncio.sleep(min(every_seconds, 60.0))
            continue
        await asyncio.sleep(every_seconds)


# --- GDPR ---------------------------------------------------------------------------------------------


def _gdpr(request: web.Request) -> None:
    if ComplianceFramework.GDPR not in request.app[CONFIG].compliance.frameworks:
        raise ApiError(404, "gdpr_disabled", "GDPR is not among this agent's compliance frameworks")


async def record_consent(request: web.Request) -> web.Response:
    _gdpr(request)
    principal = await authorize(request, Permission.WRITE, SecurityLevel.INTERNAL, "record_consent")
    body = await read_json_object(request)
    subject, purpose = string_field(body, "subject", 128), string_field(body, "purpose", 64)
    granted = body.get("granted")
    if not isinstance(granted, bool):
        raise ApiError(400, "invalid_field", "granted: true or false is required")
    evidence = body.get("evidence", "")
    if not isinstance(evidence, str) or len(evidence) > 2000:
        raise ApiError(400, "invalid_field", "evidence: a string of at most 2000 characters")
    await request.app[STORE].record_consent(subject, purpose, granted, principal.subject, evidence)
    await audit(
        request,
        type="admin",
        action="consent_granted" if granted else "consent_withdrawn",
        result="success",
        details={"subject": pseudonym(request.app, subject), "purpose": purpose},
    )
    return web.json_response({"subject": subject, "purpose": purpose, "granted": granted}, status=201)


async def consent_history(request: web.Request) -> web.Response:
    _gdpr(request)
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "read_consent")
    subject = request.match_info["subject"]
    history = await request.app[STORE].consent_history(subject)
    current = {entry["purpose"]: entry["granted"] for entry in history}
    return web.json_response({"subject": subject, "current": current, "history": history})


async def export_subject(request: web.Request) -> web.Response:
    """Art. 15 and 20: everything held about the subject, in a portable form."""
    _gdpr(request)
    await authorize(request, Permission.ADMIN, SecurityLevel.INTERNAL, "export_subject")
    subject = request.match_info["subject"]
    store = request.app[STORE]
    results = [
        {"id": r.id, "kind": r.kind, "created_at": r.created_at, "owner": r.owner, "content": json.loads(r.body)}
        for r in await store.results_of(subject)
    ]
    approvals = [
        {
            "id": a["id"],
            "operation": a["operation"],
            "purpose": a["purpose"],
            "requester": a["requester"],
            "status": a["status"],
            "decided_by": a["decided_by"],
            "created_at": a["created_at"],
            "input": json.loads(a["input"]),
        }
        for a in await store.approvals_of(subject)
    ]
    await audit(
        request,
        type="admin",
        action="export_subject",
        result="success",
        details={"subject": pseudonym(request.app, subject)},
    )
    return web.json_response(
        {
            "subject": subject,
            "consents": await store.consent_history(subject),
            "results": results,
            "approvals": approvals,
        }
    )


async def erase_subject(request: web.Request) -> web.Response:
    """Art. 17: the subject's results and consent records are deleted; approvals made for the
    subject lose their input (a pending one can no longer run), keeping the SOX record."""
    _gdpr(request)
    await authorize(request, Permission.ADMIN, SecurityLevel.INTERNAL, "erase_subject")
    subject = request.match_info["subject"]
    removed = await request.app[STORE].erase(subject)
    await audit(
        request,
        type="admin",
        action="erase_subject",
        result="success",
        details={"subject": pseudonym(request.app, subject), **removed},
    )
    return web.json_response({"erased": removed})


# --- SOX ----------------------------------------------------------------------------------------------


async def list_approvals(request: web.Request) -> web.Response:
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "list_approvals")
    return web.json_response({"pending": await request.app[STORE].pending_approvals()})


async def decide_approval(request: web.Request) -> web.Response:
    """SOX maker-checker: a second person approves (and so runs) or rejects a financial operation."""
    store = request.app[STORE]
    approval = await store.get_approval(request.match_info["id"])
    if approval is None:
        raise ApiError(404, "not_found", "no approval with this id")
    operation = request.app[REGISTRY].get(approval["operation"])
    if operation is None:
        raise ApiError(404, "unknown_operation", f"operation {approval['operation']!r} is no longer enabled")
    approver = await authorize(request, operation.permission, operation.level, f"approve:{operation.name}")
    body = await read_json_object(request)
    decision = body.get("decision")
    if decision not in ("approve", "reject"):
        raise ApiError(400, "invalid_field", "decision: approve or reject")
    details = {"approval_id": approval["id"], "requested_by": approval["requester"], "decided_by": approver.subject}
    if approver.subject == approval["requester"]:
        await audit(
            request,
            type="authz",
            action=f"approve:{operation.name}",
            result="denied",
            details={**details, "reason": "self-approval"},
        )
        raise ApiError(
            403, "self_approval", "the requester of a financial operation cannot approve it (SOX maker-checker)"
        )
    if decision == "approve":
        # The requester's budget now, before the approval is spent: refused, it stays pending.
        await admit_tokens(request, operation, approval["requester"])
    # Consent is checked again now, not only when the request was made: a withdrawal in between
    # refuses the approval for good (a later grant needs a new request).
    subject, purpose = approval["subject"], approval["purpose"] or ""
    withdrawn = decision == "approve" and subject is not None and not await store.has_consent(subject, purpose)
    status = "refused" if withdrawn else "approved" if decision == "approve" else "rejected"
    if not await store.decide_approval(approval["id"], status, approver.subject):
        current = await store.get_approval(approval["id"])
        now = current["status"] if current is not None else "gone"
        await audit(
            request,
            type="operation",
            action=f"approve:{operation.name}",
            result="failure",
            details={**details, "reason": f"already {now}"},
        )
        raise ApiError(409, "already_decided", f"this approval is already {now}")
    if withdrawn and subject is not None:
        await audit(
            request,
            type="authz",
            action=f"approve:{operation.name}",
            result="denied",
            details={
                **details,
                "reason": "consent withdrawn",
                "subject": pseudonym(request.app, subject),
                "purpose": purpose,
            },
        )
        raise ApiError(
            403,
            "consent_required",
            f"the subject no longer consents to purpose {purpose!r}; the approval is refused (GDPR)",
        )
    if decision == "reject":
        await audit(request, type="operation", action=operation.name, result="rejected", details=details)
        return web.json_response({"approval_id": approval["id"], "status": "rejected"})
    argument = validated_input(operation, json.loads(approval["input"]))
    CALLER.set(approval["requester"])  # tokens it spends come out of the requester's budget
    result = await execute(request, operation, argument, details)
    return operation_response(request, operation.name, result, approval["requester"])


# --- routes -------------------------------------------------------------------------------------------

CONSENT = Schema(
    "Consent",
    {
        "type": "object",
        "required": ["subject", "purpose", "granted"],
        "properties": {
            "subject": {"type": "string"},
            "purpose": {"type": "string"},
            "granted": {"type": "boolean"},
            "evidence": {"type": "string"},
        },
    },
)
DECISION = {
    "type": "object",
    "required": ["decision"],
    "properties": {"decision": {"type": "string", "enum": ["approve", "reject"]}},
}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/audit",
        audit_query,
        "Recent audit records (admin)",
        query=(
            QueryParameter("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            QueryParameter("actor", {"type": "string"}),
            QueryParameter("type", {"type": "string"}),
        ),
        replies=(Reply(200, "Records"),),
        errors=(400, 401, 403),
    ),
    Route(
        "POST",
        "/v1/gdpr/consents",
        record_consent,
        "Record a grant or withdrawal of consent (GDPR)",
        body=Body(CONSENT),
        replies=(Reply(201, "Recorded"),),
        errors=(400, 401, 403, 404, 413),
    ),
    Route(
        "GET",
        "/v1/gdpr/consents/{subject}",
        consent_history,
        "A subject's consents: current state and full history",
        replies=(Reply(200, "Consents"),),
        errors=(401, 403, 404),
    ),
    Route(
        "GET",
        "/v1/gdpr/subjects/{subject}/export",
        export_subject,
        "Everything held about a subject (Art. 15, 20)",
        replies=(Reply(200, "Export"),),
        errors=(401, 403, 404),
    ),
    Route(
        "DELETE",
        "/v1/gdpr/subjects/{subject}",
        erase_subject,
        "Erase a subject's data (Art. 17)",
        replies=(Reply(200, "Erased"),),
        errors=(401, 403, 404),
    ),
    Route(
        "GET",
        "/v1/approvals",
        list_approvals,
        "Pending approvals of financial operations (SOX)",
        replies=(Reply(200, "Pending"),),
        errors=(401, 403),
    ),
    Route(
        "POST",
        "/v1/approvals/{id}",
        decide_approval,
        "Approve (and run) or reject a pending financial operation; not by its requester",
        body=Body(DECISION),
        replies=(Reply(200, "Decided"), Reply(409, "Already decided, refused or erased", ERROR)),
        # 429: the requester's token budget (chat), the approval left pending.
        errors=(400, 401, 403, 404, 422, 429, 500, 502, 503, 504),
    ),
)

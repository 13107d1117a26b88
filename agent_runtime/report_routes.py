"""Reports: generate_report bound to this app's store, and their download by id. (How a report
is built lives in operations/reports.py.)

Each report is stored with its owner, the principal who made it; only the owner and admins may
download it. Anyone else gets the same 404 as for an id that does not exist, so ids cannot be
probed; the audit record says which it was."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from agent_contract.config import Permission, SecurityLevel
from agent_contract.operations import GENERATE_REPORT
from agent_runtime.api import ACTING_FOR, ApiError, audit, authorize
from agent_runtime.operations import InputError, Operation
from agent_runtime.operations.analyze import WORKER_PRELOAD as ANALYSIS_PRELOAD
from agent_runtime.operations.reports import ReportInput, build_report
from agent_runtime.routing import QueryParameter, Reply, Route
from agent_runtime.state import AUTHORIZER, STORE, WORKERS

FORMATS = ("markdown", "html", "json")
EXTENSIONS = {"markdown": "md", "html": "html", "json": "json"}
# The report's analysis runs in a CPU worker, with analyze_data's engine (operation_routes.worker_pool).
WORKER_PRELOAD = ANALYSIS_PRELOAD
# The HTML report is static: nothing may load or run, whatever a title or column name holds.
REPORT_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def report_operation(app: web.Application) -> Operation:
    """generate_report, storing each report in ``app``'s store."""

    async def generate(request: ReportInput) -> dict[str, Any]:
        try:
            # CPU-bound: in a worker process, which the operation's timeout kills.
            markdown, html_text = await app[WORKERS].run(build_report, request)
        except (ValueError, ArithmeticError) as error:
            raise InputError(str(error)) from None
        body = json.dumps({"title": request.title, "markdown": markdown, "html": html_text}).encode()
        # No caller (never the case behind the API): an owner nobody has, so admins only.
        owner = ACTING_FOR.get() or ""
        stored = await app[STORE].put("report", owner, "application/json", body, subject=request.subject)
        return {
            "report_id": stored.id,
            "download": {f: f"/v1/reports/{stored.id}?format={f}" for f in FORMATS},
        }

    return Operation.builtin(GENERATE_REPORT, generate, ReportInput)


async def download_report(request: web.Request) -> web.Response:
    principal = await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "download_report")
    report_id = request.match_info["id"][:64]  # only for the audit record; real ids are 16 characters
    wanted = request.query.get("format", "markdown")

    async def refuse(result: str, reason: str) -> None:
        await audit(
            request,
            type="operation",
            action="download_report",
            resource=report_id,
            result=result,
            details={"reason": reason},
        )

    if wanted not in FORMATS:
        await refuse("failure", "invalid format")
        raise ApiError(400, "invalid_query", "format must be markdown, html or json")
    stored = await request.app[STORE].get(request.match_info["id"])
    not_found = ApiError(404, "not_found", "no report with this id (it may have passed the retention period)")
    if stored is None or stored.kind != "report":
        await refuse("failure", "not found")
        raise not_found
    is_admin = Permission.ADMIN in request.app[AUTHORIZER].permissions(principal)
    if stored.owner != principal.subject and not is_admin:
        await refuse("denied", "not the owner")
        raise not_found
    report = json.loads(stored.body)
    await audit(
        request,
        type="operation",
        action="download_report",
        resource=stored.id,
        result="success",
        details={"format": wanted},
    )
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    if wanted == "json":
        return web.json_response(report, headers=headers)
    # A download, never rendered in the API's origin; the id is URL-safe base64, safe in the name.
    headers["Content-Disposition"] = f'attachment; filename="report-{stored.id}.{EXTENSIONS[wanted]}"'
    if wanted == "html":
        headers["Content-Security-Policy"] = REPORT_CSP
        return web.Response(text=report["html"], content_type="text/html", headers=headers)
    return web.Response(text=report["markdown"], content_type="text/markdown", headers=headers)


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/reports/{id}",
        download_report,
        "Download a stored report",
        query=(QueryParameter("format", {"type": "string", "enum": list(FORMATS)}),),
        replies=(Reply(200, "The report"),),
        errors=(400, 401, 403, 404),
    ),
)

"""Reports: generate_report bound to this app's store, and their download by id. (How a report
is built lives in operations/reports.py.)"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from agent_contract.config import Permission, SecurityLevel
from agent_contract.operations import GENERATE_REPORT
from agent_runtime.api import ApiError, audit, authorize
from agent_runtime.operations import InputError, Operation
from agent_runtime.operations.reports import ReportInput, build_report
from agent_runtime.routing import QueryParameter, Reply, Route
from agent_runtime.state import STORE

FORMATS = ("markdown", "html", "json")


def report_operation(app: web.Application) -> Operation:
    """generate_report, storing each report in ``app``'s store."""

    async def generate(request: ReportInput) -> dict[str, Any]:
        try:
            markdown, html_text = build_report(request)
        except (ValueError, ArithmeticError) as error:
            raise InputError(str(error)) from None
        body = json.dumps({"title": request.title, "markdown": markdown, "html": html_text}).encode()
        stored = await app[STORE].put("report", "agent", "application/json", body)
        return {
            "report_id": stored.id,
            "download": {f: f"/v1/reports/{stored.id}?format={f}" for f in FORMATS},
        }

    return Operation.builtin(GENERATE_REPORT, generate, ReportInput)


async def download_report(request: web.Request) -> web.Response:
    await authorize(request, Permission.READ, SecurityLevel.INTERNAL, "download_report")
    stored = await request.app[STORE].get(request.match_info["id"])
    if stored is None or stored.kind != "report":
        raise ApiError(404, "not_found", "no report with this id (it may have passed the retention period)")
    report = json.loads(stored.body)
    wanted = request.query.get("format", "markdown")
    await audit(
        request,
        type="operation",
        action="download_report",
        resource=stored.id,
        result="success",
        details={"format": wanted},
    )
    if wanted == "markdown":
        return web.Response(text=report["markdown"], content_type="text/markdown")
    if wanted == "html":
        return web.Response(text=report["html"], content_type="text/html")
    if wanted == "json":
        return web.json_response(report)
    raise ApiError(400, "invalid_query", "format must be markdown, html or json")


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

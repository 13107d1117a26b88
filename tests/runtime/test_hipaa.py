"""HIPAA: stored results are encrypted at rest; PHI sent in requests reaches neither the audit
trail nor the traces."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_contract.config import ObservabilityConfig
from agent_runtime.app import create_app
from agent_runtime.operations import BUILTINS
from agent_runtime.settings import Settings
from agent_runtime.tracing import make_tracer_provider
from tests.runtime.conftest import login, make_layout

PHI = "Patient MRN 00987654, diagnosis E11.9"


async def test_phi_is_encrypted_at_rest_and_kept_out_of_audit_and_traces(aiohttp_client: Any, tmp_path: Path) -> None:
    config_file = make_layout(
        tmp_path / "agent",
        securityLevel="restricted",
        operations=["generate_report", "process_document"],
        compliance={"frameworks": ["HIPAA"]},
        observability={"traceSampleRatio": 1.0},
    )
    exporter = InMemorySpanExporter()
    provider = make_tracer_provider(ObservabilityConfig(service_name="t", trace_sample_ratio=1.0), "t")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = await aiohttp_client(create_app(Settings.load(str(config_file)), BUILTINS, tracer_provider=provider))
    headers = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}

    report = await client.post(
        "/v1/operations/generate_report",
        json={"input": {"title": PHI, "analysis": {"data": [{"a": 1}, {"a": 2}]}}},
        headers=headers,
    )
    assert report.status == 200, await report.text()
    document = await client.post("/v1/operations/process_document", json={"input": {"content": PHI}}, headers=headers)
    assert document.status == 200
    assert (await document.json())["result"]["contains_phi"] is True
    download = await client.get((await report.json())["result"]["download"]["markdown"], headers=headers)
    assert (await download.text()).startswith(f"# {PHI}")  # readable through the API

    await client.close()  # flush the audit trail and close the store
    with sqlite3.connect(tmp_path / "agent" / "data" / "store.sqlite3") as db:
        (body,) = db.execute("SELECT body FROM results").fetchone()
    assert body.startswith(b"v1.")
    assert b"00987654" not in body
    assert b"00987654" not in (tmp_path / "agent" / "data" / "store.sqlite3").read_bytes()
    assert "00987654" not in (tmp_path / "agent" / "data" / "audit.log").read_text()
    spans = exporter.get_finished_spans()
    assert spans  # sampled at 1.0: there is something to look through
    for span in spans:
        assert "00987654" not in str(span.attributes)
        assert "00987654" not in span.name


async def test_approval_input_is_encrypted_at_rest(aiohttp_client: Any, tmp_path: Path) -> None:
    """A financial operation's input waits for its approval in the store: sealed, yet it still runs."""
    config_file = make_layout(
        tmp_path / "agent",
        securityLevel="restricted",
        operations=["process_document"],
        compliance={"frameworks": ["HIPAA", "SOX"], "financialOperations": ["process_document"]},
    )
    client = await aiohttp_client(create_app(Settings.load(str(config_file)), BUILTINS))
    maker = {"Authorization": f"Bearer {(await login(client, 'otto'))['access_token']}"}
    checker = {"Authorization": f"Bearer {(await login(client, 'ada'))['access_token']}"}
    pending = await client.post("/v1/operations/process_document", json={"input": {"content": PHI}}, headers=maker)
    assert pending.status == 202, await pending.text()
    approval_id = (await pending.json())["approval_id"]
    with sqlite3.connect(tmp_path / "agent" / "data" / "store.sqlite3") as db:
        (stored,) = db.execute("SELECT input FROM approvals WHERE id = ?", (approval_id,)).fetchone()
    assert stored.startswith("v1.")
    assert "00987654" not in stored

    approved = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve"}, headers=checker)
    assert approved.status == 200, await approved.text()
    assert (await approved.json())["result"]["contains_phi"] is True  # opened again to run

    await client.close()
    data = tmp_path / "agent" / "data"
    for path in data.glob("store.sqlite3*"):  # the database and its write-ahead log
        assert b"00987654" not in path.read_bytes(), path.name

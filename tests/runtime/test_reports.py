"""generate_report: a stored Markdown/HTML report downloadable by id; the retention purge."""

from __future__ import annotations

import time
from pathlib import Path

from agent_runtime.store import Store
from tests.runtime.conftest import AppFactory, login


async def test_report_is_generated_stored_and_downloadable(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    token = (await login(client, "ana"))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    body = {
        "input": {
            "title": "Q3 <latency>",
            "analysis": {"data": [{"ms": 10, "n": 1}, {"ms": 20, "n": 2}, {"ms": 30, "n": 3}]},
        }
    }
    response = await client.post("/v1/operations/generate_report", json=body, headers=headers)
    result = (await response.json())["result"]
    assert response.status == 200, result
    markdown = await client.get(result["download"]["markdown"], headers=headers)
    assert markdown.content_type == "text/markdown"
    text = await markdown.text()
    assert text.startswith("# Q3 <latency>")
    assert "| ms | 3 | 20 | 10 | 10 | 20 | 30 | 0 |" in text
    assert "- ms and n: 1" in text
    page = await client.get(result["download"]["html"], headers=headers)
    assert page.content_type == "text/html"
    assert "<h1>Q3 &lt;latency&gt;</h1>" in await page.text()  # escaped, no HTML injection
    missing = await client.get("/v1/reports/no-such-report", headers=headers)
    assert missing.status == 404
    anonymous = await client.get(result["download"]["html"])
    assert anonymous.status == 401


async def test_retention_purges_old_results(tmp_path: Path) -> None:
    now = [time.time()]
    store = Store(tmp_path / "store.sqlite3", clock=lambda: now[0])
    store.open()
    try:
        old = await store.put("report", "agent", "application/json", b"{}")
        now[0] += 10 * 86400
        fresh = await store.put("report", "agent", "application/json", b"{}")
        assert await store.purge_older_than(7) == 1
        assert await store.get(old.id) is None
        assert await store.get(fresh.id) is not None
    finally:
        store.close()

"""generate_report: a stored Markdown/HTML report downloadable by id; the retention purge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

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
    assert text.startswith("# Q3 \\<latency\\>")  # escaped: no raw HTML in the Markdown
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
    await store.open()
    try:
        old = await store.put("report", "agent", "application/json", b"{}")
        now[0] += 10 * 86400
        fresh = await store.put("report", "agent", "application/json", b"{}")
        assert await store.purge_older_than(7) == 1
        assert await store.get(old.id) is None
        assert await store.get(fresh.id) is not None
    finally:
        await store.close()


REPORT = {"input": {"title": "Weekly", "analysis": {"data": [{"ms": 10}, {"ms": 20}]}}}


async def _headers(client: Any, username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(client, username))['access_token']}"}


async def test_a_report_is_downloadable_by_its_owner_and_admins_only(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    owner, other, viewer, admin = [await _headers(client, name) for name in ("ana", "otto", "vic", "ada")]
    made = await client.post("/v1/operations/generate_report", json=REPORT, headers=owner)
    assert made.status == 200, await made.text()
    url = (await made.json())["result"]["download"]["json"]
    report_id = url.split("/")[-1].split("?")[0]

    assert (await client.get(url, headers=owner)).status == 200
    assert (await client.get(url, headers=admin)).status == 200
    for stranger in (other, viewer):
        refused = await client.get(url, headers=stranger)
        # The same answer as for an id that does not exist, so ids cannot be probed.
        assert (refused.status, (await refused.json())["code"]) == (404, "not_found")
    missing = await client.get("/v1/reports/no-such-report", headers=other)
    assert (missing.status, (await missing.json())["code"]) == (404, "not_found")

    trail = await (await client.get("/v1/audit?limit=1000", headers=admin)).json()
    downloads = [(r["actor"], r["result"]) for r in reversed(trail["records"]) if r["action"] == "download_report"]
    assert downloads == [
        ("ana", "success"),
        ("ada", "success"),
        ("otto", "denied"),
        ("vic", "denied"),
        ("otto", "failure"),
    ]
    denied = next(r for r in trail["records"] if r["action"] == "download_report" and r["result"] == "denied")
    assert denied["resource"] == report_id


async def test_a_bad_format_is_audited_as_a_failure(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    headers = await _headers(client, "ada")
    made = await client.post("/v1/operations/generate_report", json=REPORT, headers=headers)
    report_id = (await made.json())["result"]["report_id"]
    bad = await client.get(f"/v1/reports/{report_id}?format=pdf", headers=headers)
    assert (bad.status, (await bad.json())["code"]) == (400, "invalid_query")
    trail = await (await client.get("/v1/audit?limit=1000", headers=headers)).json()
    (record,) = [r for r in trail["records"] if r["action"] == "download_report"]
    assert (record["result"], record["details"]["reason"]) == ("failure", "invalid format")


async def test_report_downloads_carry_safe_headers(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    headers = await _headers(client, "ana")
    made = await client.post("/v1/operations/generate_report", json=REPORT, headers=headers)
    result = (await made.json())["result"]
    page = await client.get(result["download"]["html"], headers=headers)
    assert page.status == 200
    policy = page.headers["Content-Security-Policy"]
    directives = {part.strip().split(" ")[0]: part.strip() for part in policy.split(";")}
    assert directives["default-src"] == "default-src 'none'"
    assert "script-src" not in directives  # nothing may run, whatever the report contains
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Content-Disposition"] == f'attachment; filename="report-{result["report_id"]}.html"'
    markdown = await client.get(result["download"]["markdown"], headers=headers)
    assert markdown.headers["X-Content-Type-Options"] == "nosniff"
    assert markdown.headers["Content-Disposition"] == f'attachment; filename="report-{result["report_id"]}.md"'


async def test_markdown_report_escapes_titles_and_column_names(make_client: AppFactory) -> None:
    client = await make_client(operations=["generate_report"])
    headers = await _headers(client, "ana")
    title = "Q3 [click](javascript:alert(1)) <img src=x onerror=alert(1)>\n# injected heading"
    column = "<b>ms</b>|[evil](https://evil.example)"
    body = {"input": {"title": title, "analysis": {"data": [{column: 1, "n": 2}, {column: 3, "n": 5}]}}}
    made = await client.post("/v1/operations/generate_report", json=body, headers=headers)
    assert made.status == 200, await made.text()
    text = await (await client.get((await made.json())["result"]["download"]["markdown"], headers=headers)).text()

    rendered = MarkdownIt("commonmark").enable("table").render(text)  # html is on in commonmark
    assert "<img" not in rendered
    assert "<b>" not in rendered
    assert "<a " not in rendered
    assert rendered.count("<h1>") == 1  # the title stays on its heading line
    assert "<h1>Q3 [click](javascript:alert(1)) &lt;img src=x onerror=alert(1)&gt; # injected heading</h1>" in rendered
    assert "<td>&lt;b&gt;ms&lt;/b&gt;|[evil](https://evil.example)</td>" in rendered  # one cell, shown as text

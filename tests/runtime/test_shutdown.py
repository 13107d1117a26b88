"""SIGTERM under load: in-flight requests complete, nothing is answered with an error, every
answered request has its audit record, and the trail ends with a final checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from agent_contract.keyfiles import KeyRing
from agent_runtime.audit import verify_lines
from eao_devtools.testkit.runtime import live_runtime
from tests.runtime.conftest import make_layout
from tests.runtime.live import load_then, login


async def test_sigterm_under_load_finishes_in_flight_work(tmp_path: Path) -> None:
    config = make_layout(tmp_path / "agent")
    with live_runtime(config) as (server, base):
        answered = await load_then(base, login(base), 16, 1.0, lambda: server.send_signal(signal.SIGTERM))
        assert server.wait(timeout=30) == 0
    assert len(answered) > 100
    assert set(answered.values()) == {200}, {status for status in answered.values() if status != 200}
    lines = (tmp_path / "agent" / "data" / "audit.log").read_text().splitlines(keepends=True)
    result = verify_lines(lines, KeyRing.load(tmp_path / "agent" / "keys"))
    assert result.ok, result.describe()
    # The id the client sent (X-Request-ID) is kept as details.client_request_id beside the server's.
    recorded = {json.loads(line).get("details", {}).get("client_request_id") for line in lines}
    assert [request_id for request_id in answered if request_id not in recorded] == []
    assert json.loads(lines[-1])["type"] == "checkpoint"  # closed cleanly: the final checkpoint is there

"""The audit trail: tamper detection of every kind, checkpoints, the verify CLI, and crash safety."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import KeyRing, new_key_files, write_key_files
from agent_runtime.audit import AuditLog, chain_hash, verify_lines
from eao_devtools.testkit.runtime import live_runtime
from tests.runtime.conftest import make_layout
from tests.runtime.live import load_then, login

AGENT_RUNTIME = str(Path(sys.executable).parent / "agent-runtime")


@pytest.fixture
def keys(tmp_path: Path) -> KeyRing:
    write_key_files(tmp_path / "keys", new_key_files(SigningAlgorithm.EDDSA))
    return KeyRing.load(tmp_path / "keys")


async def _write_trail(path: Path, keys: KeyRing, count: int = 10) -> list[str]:
    log = AuditLog(path, keys, to_stdout=False, checkpoint_every=4)
    await log.start()
    for index in range(count):
        await log.record(
            type="operation", action="ping", result="success", actor=f"user{index}", request_id=f"r{index}"
        )
    await log.close()
    return path.read_text().splitlines(keepends=True)


async def test_an_untouched_trail_verifies_with_signed_checkpoints(tmp_path: Path, keys: KeyRing) -> None:
    lines = await _write_trail(tmp_path / "audit.log", keys)
    result = verify_lines(lines, keys)
    assert result.ok, result.describe()
    assert result.records == 10
    assert result.checkpoints == 3  # after records 4 and 8, and the final one at close


def _edit(lines: list[str], index: int, **changes: object) -> list[str]:
    record = json.loads(lines[index])
    record.update(changes)
    return [*lines[:index], json.dumps(record) + "\n", *lines[index + 1 :]]


async def test_every_kind_of_tampering_is_named(tmp_path: Path, keys: KeyRing) -> None:
    lines = await _write_trail(tmp_path / "audit.log", keys)
    forged = json.loads(lines[2])
    forged["actor"] = "mallory"
    forged["hash"] = chain_hash(forged)  # re-hashed, but the next record still points at the old hash
    cases = {
        "edit": (_edit(lines, 2, actor="mallory"), 3, "edited"),
        "edit and re-hash": ([*lines[:2], json.dumps(forged) + "\n", *lines[3:]], 4, "prev hash differs"),
        "deletion": ([*lines[:2], *lines[3:]], 3, "removed, inserted or moved"),
        "insertion": ([*lines[:3], lines[1], *lines[3:]], 4, "removed, inserted or moved"),
        "reordering": ([lines[0], lines[2], lines[1], *lines[3:]], 2, "removed, inserted or moved"),
        "garbage line": ([*lines[:5], "not json\n", *lines[5:]], 6, "not a JSON record"),
    }
    for name, (tampered, first_bad, reason) in cases.items():
        result = verify_lines(tampered, keys)
        assert not result.ok, name
        assert result.first_bad_line == first_bad, (name, result.describe())
        assert reason in result.reason, (name, result.reason)


async def test_a_rewritten_chain_fails_its_checkpoint_signature(tmp_path: Path, keys: KeyRing) -> None:
    """Someone who rewrites every record and re-hashes the whole chain still cannot sign."""
    lines = await _write_trail(tmp_path / "audit.log", keys)
    records = [json.loads(line) for line in lines]
    head = "0" * 64
    for record in records:
        if record["type"] != "checkpoint":
            record["actor"] = "mallory"
        else:
            record["details"]["head"] = head
        record["prev"] = head
        record["hash"] = chain_hash(record)
        head = record["hash"]
    result = verify_lines([json.dumps(r) + "\n" for r in records], keys)
    assert not result.ok
    assert result.reason == "checkpoint signature does not verify"
    assert verify_lines([json.dumps(r) + "\n" for r in records], None).ok  # only the signature catches it


async def test_verify_cli_names_the_first_bad_record(tmp_path: Path, keys: KeyRing) -> None:
    lines = await _write_trail(tmp_path / "audit.log", keys)
    good = subprocess.run(
        [AGENT_RUNTIME, "audit", "verify", str(tmp_path / "audit.log"), "--keys", str(tmp_path / "keys")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0
    assert "chain intact, signatures verified" in good.stdout
    (tmp_path / "bad.log").write_text("".join(_edit(lines, 6, result="failure")))
    bad = subprocess.run(
        [AGENT_RUNTIME, "audit", "verify", str(tmp_path / "bad.log")], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert "TAMPERED at line 7 (record seq 7)" in bad.stdout


async def test_restart_continues_the_chain_and_drops_a_torn_tail(tmp_path: Path, keys: KeyRing) -> None:
    path = tmp_path / "audit.log"
    await _write_trail(path, keys, count=3)
    with path.open("a") as handle:
        handle.write('{"seq": 99, "half a rec')  # a crash in the middle of a write
    log = AuditLog(path, keys, to_stdout=False)
    await log.start()
    await log.record(type="admin", action="restart", result="success")
    await log.close()
    assert verify_lines(path.read_text().splitlines(keepends=True), keys).ok


async def test_no_acknowledged_request_loses_its_record_on_kill_9(tmp_path: Path) -> None:
    config = make_layout(tmp_path / "agent")
    with live_runtime(config) as (server, base):
        # SIGKILL mid-load: no chance to flush anything.
        answered = await load_then(base, login(base), 32, 1.5, lambda: server.send_signal(signal.SIGKILL))
    acknowledged = [request_id for request_id, status in answered.items() if status == 200]
    assert len(acknowledged) > 100, "the load was too light to show anything"
    text = (tmp_path / "agent" / "data" / "audit.log").read_text()
    complete = [line for line in text.splitlines(keepends=True) if line.endswith("\n")]
    recorded = {json.loads(line).get("request_id") for line in complete}
    assert [request_id for request_id in acknowledged if request_id not in recorded] == []
    assert verify_lines(complete, KeyRing.load(tmp_path / "agent" / "keys")).ok


async def test_hostile_text_stays_on_one_line(tmp_path: Path, keys: KeyRing) -> None:
    """Separators that line-based tools split on (U+2028, U+0085, \\r) and NUL never break a record."""
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False)
    await log.start()
    hostile = "a\u2028b\x85c\rd\x00e\U0001f600f\ud800"
    await log.record(type="authn", action="login", result="failure", actor=hostile, details={"x": hostile})
    await log.close()
    data = (tmp_path / "audit.log").read_bytes()
    assert data.isascii()
    lines = data.decode().splitlines(keepends=True)
    assert len(lines) == 2  # the record and the final checkpoint
    assert json.loads(lines[0])["actor"] == hostile
    assert verify_lines(lines, keys).ok

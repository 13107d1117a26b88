"""The audit trail: tamper detection of every kind, signed checkpoints with a dedicated audit key,
verification with public keys only, the unsigned tail, the log collector's copy of the
checkpoints, recovery that keeps damaged bytes aside, and crash safety."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp.plugin import AiohttpClient

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import AUDIT_PREFIX, KeyRing, new_key_files, write_key_files
from agent_contract.layout import regular_files
from agent_runtime import audit as audit_module
from agent_runtime.app import create_app
from agent_runtime.audit import (
    GENESIS,
    AuditLog,
    AuditUnavailableError,
    Status,
    _AppendProcess,
    chain_hash,
    checkpoint_message,
    verify_lines,
    verify_trail,
)
from agent_runtime.cli import main as runtime_cli
from agent_runtime.operations import BUILTINS
from agent_runtime.settings import Settings
from eao_devtools.testkit.operator_process import free_port
from eao_devtools.testkit.runtime import live_runtime
from tests.runtime.conftest import AGENT_RUNTIME, make_layout
from tests.runtime.live import load_then, login


@pytest.fixture
def keys(tmp_path: Path) -> KeyRing:
    write_key_files(tmp_path / "keys", new_key_files(SigningAlgorithm.EDDSA))
    return KeyRing.load(tmp_path / "keys")


async def _write_trail(path: Path, keys: KeyRing | None, count: int = 10, copy: io.StringIO | None = None) -> list[str]:
    """A closed trail: start checkpoint (seq 1), records 2-5, checkpoint 6, records 7-10,
    checkpoint 11, records 12-13, final checkpoint 14 (for the default 10 records)."""
    log = AuditLog(path, keys, to_stdout=False, checkpoint_every=4, stream=copy or io.StringIO())
    await log.start()
    for index in range(count):
        await log.record(
            type="operation", action="ping", result="success", actor=f"user{index}", request_id=f"r{index}"
        )
    await log.close()
    return path.read_text().splitlines(keepends=True)


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``agent-runtime audit verify ARGS`` in-process: its exit code and what it printed."""
    capsys.readouterr()
    code = runtime_cli(["audit", "verify", *args])
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    return code, printed.out + printed.err


def _export_keys(keys_dir: Path, target: Path) -> Path:
    """What an auditor is given: the JWK set ``agent-runtime audit export-key`` prints."""
    exported = subprocess.run(
        [AGENT_RUNTIME, "audit", "export-key", "--keys", str(keys_dir)], capture_output=True, text=True, check=False
    )
    assert exported.returncode == 0, exported.stderr
    target.write_text(exported.stdout)
    return target


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def _dump(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(record) + "\n" for record in records]


def _rehash(records: list[dict[str, Any]], head: str = GENESIS, signer: Any = None) -> list[str]:
    """Re-links and re-hashes records as a forger would; with ``signer`` (a stolen audit private
    key) checkpoints are re-signed too."""
    for record in records:
        record["prev"] = head
        if record["type"] == "checkpoint":
            record["details"].update(head=head, upto=record["seq"] - 1)
            if signer is not None:
                record["details"]["signature"] = base64.b64encode(signer.sign(checkpoint_message(record))).decode()
        record["hash"] = head = chain_hash(record)
    return _dump(records)


def _edit(lines: list[str], index: int, **changes: object) -> list[str]:
    record = json.loads(lines[index])
    record.update(changes)
    return [*lines[:index], json.dumps(record) + "\n", *lines[index + 1 :]]


@pytest.mark.parametrize("algorithm", ["EdDSA", "HS256"])
async def test_an_auditor_verifies_with_the_exported_public_keys_only(tmp_path: Path, algorithm: str) -> None:
    """The audit key is its own Ed25519 key whatever the token algorithm, and verify needs nothing
    private: the auditor's directory holds the trail and the exported JWK set only."""
    assert runtime_cli(["init", str(tmp_path / "agent"), "--algorithm", algorithm]) == 0
    ring = KeyRing.load(tmp_path / "agent" / "keys")
    await _write_trail(tmp_path / "agent" / "audit.log", ring)
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    jwks = _export_keys(tmp_path / "agent" / "keys", auditor / "audit-keys.json")
    (auditor / "audit.log").write_bytes((tmp_path / "agent" / "audit.log").read_bytes())

    exported = json.loads(jwks.read_text())["keys"]
    assert [key["kid"] for key in exported] == [ring.active_audit]
    assert ring.active_audit != ring.active_signing
    assert all(set(key) == {"kty", "crv", "x", "kid", "alg", "use"} for key in exported)  # no private "d"

    verified = subprocess.run(
        [AGENT_RUNTIME, "audit", "verify", str(auditor / "audit.log"), "--public-keys", str(jwks)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok: 10 records, 4 checkpoints" in verified.stdout

    # Another agent's public keys do not vouch for this trail.
    assert runtime_cli(["init", str(tmp_path / "other")]) == 0
    other = _export_keys(tmp_path / "other" / "keys", auditor / "other-keys.json")
    wrong = subprocess.run(
        [AGENT_RUNTIME, "audit", "verify", str(auditor / "audit.log"), "--public-keys", str(other)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode == 1
    assert f"line 1 (record seq 1): checkpoint signed by unknown key {ring.active_audit!r}" in wrong.stdout


async def test_verify_answers_every_bad_input_without_a_traceback(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    await _write_trail(tmp_path / "audit.log", keys)
    jwks = _export_keys(tmp_path / "keys", tmp_path / "keys.json")
    bad_keys = {
        "a directory": tmp_path / "keys",
        "missing": tmp_path / "nothing.json",
        "a private key": next((tmp_path / "keys").glob(f"{AUDIT_PREFIX}*")),
        "random bytes": tmp_path / "random.bin",
        "not a JWK set": tmp_path / "list.json",
        "a bad x": tmp_path / "badx.json",
    }
    bad_keys["random bytes"].write_bytes(bytes(range(256)) * 4)
    bad_keys["not a JWK set"].write_text("[1, 2, 3]")
    bad_keys["a bad x"].write_text(json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "AAAA"}]}))
    for name, path in bad_keys.items():
        code, printed = _verify(capsys, str(tmp_path / "audit.log"), "--public-keys", str(path))
        assert code == 2, name
        assert printed.startswith("error: "), (name, printed)
    code, printed = _verify(capsys, str(tmp_path / "audit.log"), "--keys", str(jwks))
    assert (code, printed.startswith("error: ")) == (2, True)
    code, printed = _verify(capsys, str(tmp_path / "audit.log"))
    assert code == 2
    assert "--public-keys" in printed

    bad_trails = {
        "empty": b"",
        "random bytes": bytes(range(256)) * 4,
        "not UTF-8": b'{"seq": 1, "x": "\xff\xfe"}\n',
        "deeply nested": b"[" * 100_000 + b"\n",
        "a JSON list": b"[1, 2]\n",
        "wrong types": b'{"seq": true, "prev": 1, "hash": null, "type": "checkpoint", "details": []}\n',
    }
    for name, content in bad_trails.items():
        (tmp_path / "bad.log").write_bytes(content)
        code, printed = _verify(capsys, str(tmp_path / "bad.log"), "--public-keys", str(jwks))
        assert code == 1, (name, printed)
        assert printed.startswith("FAILED: "), (name, printed)
    code, printed = _verify(capsys, str(tmp_path), "--public-keys", str(jwks))
    assert (code, printed.startswith("error: ")) == (2, True)


async def test_every_kind_of_tampering_is_named(tmp_path: Path, keys: KeyRing) -> None:
    lines = await _write_trail(tmp_path / "audit.log", keys)
    forged = json.loads(lines[3])
    forged["actor"] = "mallory"
    forged["hash"] = chain_hash(forged)  # re-hashed, but the next record still points at the old hash
    swapped_checkpoints = [*lines[:5], lines[10], *lines[6:10], lines[5], *lines[11:]]
    cases = {
        "edit": (_edit(lines, 3, actor="mallory"), 4, "edited"),
        "edit and re-hash": ([*lines[:3], json.dumps(forged) + "\n", *lines[4:]], 5, "prev hash differs"),
        "deletion": ([*lines[:3], *lines[4:]], 4, "removed, inserted or moved"),
        "insertion": ([*lines[:4], lines[2], *lines[4:]], 5, "removed, inserted or moved"),
        "reordering": ([lines[0], lines[2], lines[1], *lines[3:]], 2, "removed, inserted or moved"),
        "garbage line": ([*lines[:6], "not json\n", *lines[6:]], 7, "not a JSON record"),
        "checkpoint deleted": ([*lines[:5], *lines[6:]], 6, "removed, inserted or moved"),
        "checkpoints swapped": (swapped_checkpoints, 6, "removed, inserted or moved"),
        "checkpoint edited": (_edit(lines, 5, time="2020-01-01T00:00:00.000000Z"), 6, "edited"),
    }
    for name, (tampered, first_bad, reason) in cases.items():
        result = verify_lines(tampered, keys)
        assert result.status is Status.FAILED, name
        assert result.first_bad_line == first_bad, (name, result.describe())
        assert reason in result.reason, (name, result.reason)
        assert f"line {first_bad} (" in result.describe(), name


async def test_a_rewritten_chain_fails_its_checkpoint_signature(tmp_path: Path, keys: KeyRing) -> None:
    """Someone who rewrites every record and re-hashes the whole chain still cannot sign."""
    records = _records(await _write_trail(tmp_path / "audit.log", keys))
    for record in records:
        if record["type"] != "checkpoint":
            record["actor"] = "mallory"
    result = verify_lines(_rehash(records), keys)
    assert result.status is Status.FAILED
    assert (result.first_bad_line, result.reason) == (6, "checkpoint signature does not verify")


async def test_a_cut_or_forged_tail_is_never_ok(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the log collector's copy, a cut tail looks like an unclean shutdown: exit 3 naming
    the unsigned span, never 0; anything the runtime would not have written is exit 1."""
    lines = await _write_trail(tmp_path / "audit.log", keys)
    jwks = str(_export_keys(tmp_path / "keys", tmp_path / "keys.json"))
    trail = tmp_path / "tampered.log"

    def verify(content: list[str]) -> tuple[int, str]:
        trail.write_text("".join(content))
        return _verify(capsys, str(trail), "--public-keys", jwks)

    assert verify(lines)[0] == 0
    code, printed = verify(lines[:13])  # the final checkpoint cut off
    assert code == 3
    assert "records 12-13 after the last checkpoint (seq 11) are not signed" in printed
    code, printed = verify(lines[:11])  # the last records and the final checkpoint cut off
    assert code == 3
    assert "the trail ends at checkpoint seq 11, which is not a final checkpoint" in printed

    # The tail after the last checkpoint edited and re-hashed: as unsigned as a crash leaves it.
    head = json.loads(lines[10])["hash"]
    tail = _records(lines[11:13])
    tail[0]["result"] = "failure"
    code, printed = verify([*lines[:11], *_rehash(tail, head)])
    assert code == 3
    assert "records 12-13 after the last checkpoint (seq 11) are not signed" in printed

    # More forged records than a checkpoint interval holds.
    template = json.loads(lines[11])
    forged = [{**template, "seq": 12 + n, "actor": f"ghost{n}"} for n in range(5)]
    code, printed = verify([*lines[:11], *_rehash(forged, head)])
    assert code == 1
    assert "records 12-16 after the checkpoint at seq 11 are 5 records, more than its interval of 4" in printed

    # Few records, but spread over longer than the checkpoint interval in seconds (60 s).
    late = [{**template, "seq": 12 + n, "time": f"2030-01-01T0{n}:00:00.000000Z"} for n in range(2)]
    code, printed = verify([*lines[:11], *_rehash(late, head)])
    assert code == 1
    assert "records 12-13 after the checkpoint at seq 11 were unsigned for 3600 s" in printed

    # Records appended after a clean shutdown's final checkpoint.
    appended = [{**template, "seq": 15}]
    code, printed = verify([*lines, *_rehash(appended, json.loads(lines[13])["hash"])])
    assert code == 1
    assert "line 15 (record seq 15): follows the final checkpoint (seq 14) without a signed restart" in printed


async def test_a_trail_without_any_checkpoint_fails(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = await _write_trail(tmp_path / "audit.log", keys)
    jwks = str(_export_keys(tmp_path / "keys", tmp_path / "keys.json"))
    records = [record for record in _records(lines) if record["type"] != "checkpoint"]
    for seq, record in enumerate(records, start=1):
        record["seq"] = seq
    (tmp_path / "rewritten.log").write_text("".join(_rehash(records)))  # from scratch, re-hashed
    code, printed = _verify(capsys, str(tmp_path / "rewritten.log"), "--public-keys", jwks)
    assert code == 1
    assert "line 1 (record seq 1): comes before any checkpoint" in printed
    (tmp_path / "empty.log").write_text("")
    code, printed = _verify(capsys, str(tmp_path / "empty.log"), "--public-keys", jwks)
    assert code == 1
    assert "the trail has no checkpoint" in printed


async def test_the_log_collectors_copy_catches_a_cut_or_a_rewrite(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every checkpoint also goes to stdout; a trail cut or rewritten after a checkpoint was
    shipped fails against that copy, even when rewritten by someone holding the audit key."""
    stdout = io.StringIO()
    lines = await _write_trail(tmp_path / "audit.log", keys, copy=stdout)
    shipped = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [item["audit_checkpoint"]["seq"] for item in shipped] == [1, 6, 11, 14]
    assert shipped[0]["audit_checkpoint"]["details"]["every"] == 4
    assert shipped[0]["audit_checkpoint"]["details"]["seconds"] == 60.0
    # As a collector keeps it: container-runtime prefixes, and the pod's other output around it.
    copy = tmp_path / "collected.log"
    copy.write_text(
        "".join(f"2026-12-01T10:00:0{n}.0Z stdout F {line}\n" for n, line in enumerate(stdout.getvalue().splitlines()))
        + "some other log line\n"
    )
    jwks = str(_export_keys(tmp_path / "keys", tmp_path / "keys.json"))
    trail = tmp_path / "tampered.log"

    def verify(content: list[str]) -> tuple[int, str]:
        trail.write_text("".join(content))
        return _verify(capsys, str(trail), "--public-keys", jwks, "--checkpoints", str(copy))

    code, printed = verify(lines)
    assert code == 0, printed
    assert "4 of the 4 checkpoints the log collector holds for this trail are in it, unchanged" in printed

    code, printed = verify(lines[:11])
    assert code == 1
    assert "the trail ends at seq 11, but the log collector holds the signed checkpoint seq 14" in printed
    assert "records 12-14 were cut off" in printed

    # Rewritten by an insider holding the audit private key: it verifies on its own, not against the copy.
    insider = _records(lines)
    insider[3]["result"] = "failure"
    signer = keys.audit[str(keys.active_audit)]
    rewritten = _rehash(insider, signer=signer)
    assert verify_lines(rewritten, keys).ok
    code, printed = verify(rewritten)
    assert code == 1
    assert "record seq 6 differs from the signed checkpoint the log collector holds" in printed

    # Rewritten from scratch: a new trail, with a new id the collector never saw.
    await _write_trail(tmp_path / "fresh.log", keys)
    code, printed = verify((tmp_path / "fresh.log").read_text().splitlines(keepends=True))
    assert code == 1
    assert "the checkpoint copy holds no checkpoint of this trail" in printed

    # A forged line in the copy is no checkpoint.
    forged = json.loads(stdout.getvalue().splitlines()[1])
    forged["audit_checkpoint"]["details"]["every"] = 4000
    forged["audit_checkpoint"]["hash"] = chain_hash(forged["audit_checkpoint"])
    copy.write_text(stdout.getvalue() + json.dumps(forged) + "\n")
    code, printed = verify(lines)
    assert code == 1
    assert "line 5 of the checkpoint copy: checkpoint signature does not verify (seq 6)" in printed


def _serve(config: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``agent-runtime serve`` with its stdout kept, as the log collector keeps it."""
    port = free_port()
    server = subprocess.Popen(
        [AGENT_RUNTIME, "serve", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return server, base
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError("the runtime did not start") from None
            time.sleep(0.1)


def test_serve_prints_its_checkpoints_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_layout(tmp_path / "agent")  # records to stdout off: checkpoint lines only
    server, base = _serve(config)
    try:
        for _ in range(3):  # audited: a refused token
            request = urllib.request.Request(
                f"{base}/v1/operations/ping", data=b"{}", headers={"Authorization": "Bearer nonsense"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401
        server.send_signal(signal.SIGTERM)
        stdout, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0
    copy = tmp_path / "stdout.log"
    copy.write_bytes(stdout)
    shipped = [json.loads(line)["audit_checkpoint"] for line in stdout.decode().splitlines()]
    assert [item["details"]["reason"] for item in shipped] == ["start", "final"]
    trail = tmp_path / "agent" / "data" / "audit.log"
    keys_dir = str(tmp_path / "agent" / "keys")
    code, printed = _verify(capsys, str(trail), "--keys", keys_dir, "--checkpoints", str(copy))
    assert code == 0, printed
    lines = trail.read_text().splitlines(keepends=True)
    trail.write_text("".join(lines[:-2]))
    code, printed = _verify(capsys, str(trail), "--keys", keys_dir, "--checkpoints", str(copy))
    assert code == 1
    assert f"records {len(lines) - 1}-{len(lines)} were cut off" in printed


async def test_recovery_keeps_every_record_after_a_damaged_line(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    """One bad byte in the middle: later records stay, the bytes are copied aside with their
    offset, the recovery is audited, and verify names the damaged line and goes on checking."""
    path = tmp_path / "audit.log"
    lines = await _write_trail(path, keys)
    data = bytearray(path.read_bytes())
    offset = sum(len(line) for line in lines[:3])  # line 4, record seq 4 (request r2)
    data[offset + 1] = 0xFF
    damaged_line = bytes(data[offset : offset + len(lines[3])])
    path.write_bytes(bytes(data))

    for _ in range(2):  # the second restart finds the damage already declared: no second report
        log = AuditLog(path, keys, to_stdout=False, checkpoint_every=4, stream=io.StringIO())
        await log.start()
        await log.record(type="admin", action="restart", result="success")
        await log.close()

    text = path.read_text(errors="replace").splitlines()
    recorded = [json.loads(line) for index, line in enumerate(text) if index != 3]
    assert [r["request_id"] for r in recorded if r["type"] == "operation"] == [f"r{n}" for n in range(10) if n != 2]
    recovers = [r for r in recorded if r["action"] == "recover"]
    assert len(recovers) == 1
    details = recovers[0]["details"]
    assert details["damaged"] == [
        {"offset": offset, "length": len(damaged_line), "line": 4, "sha256": details["damaged"][0]["sha256"]}
    ]
    aside = [json.loads(line) for line in (tmp_path / details["set_aside"]).read_text().splitlines()]
    assert [(item["offset"], base64.b64decode(item["base64"])) for item in aside] == [(offset, damaged_line)]

    code, printed = _verify(capsys, str(path), "--keys", str(tmp_path / "keys"))
    assert code == 1
    assert (
        f"FAILED: line 4 (after record seq 3): damaged ({len(damaged_line)} bytes at offset {offset}); set aside by "
        f"the runtime's recovery (record seq {recovers[0]['seq']}) in {details['set_aside']}"
    ) in printed
    assert printed.count("FAILED") == 1  # the rest of the trail checked out
    # The walk goes on past the damage: an edit after it is caught too.
    edited = path.read_bytes().replace(lines[8].encode(), _edit(lines, 8, actor="mallory")[8].encode())
    described = verify_trail(edited, keys).describe()
    assert "FAILED: line 4 (after record seq 3): damaged" in described
    assert "FAILED: line 9 (record seq 9): content does not match its hash" in described


async def test_a_torn_last_line_is_set_aside_and_the_unclean_span_reported(
    tmp_path: Path, keys: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file as a crash leaves it: no final checkpoint, half a line at the end."""
    path = tmp_path / "audit.log"
    lines = await _write_trail(path, keys)
    torn = b'{"seq": 14, "half a rec'
    path.write_bytes("".join(lines[:13]).encode() + torn)
    code, printed = _verify(capsys, str(path), "--keys", str(tmp_path / "keys"))
    assert code == 3
    assert f"line 14: an incomplete last line ({len(torn)} bytes)" in printed

    log = AuditLog(path, keys, to_stdout=False, stream=io.StringIO())
    await log.start()
    await log.record(type="admin", action="restart", result="success")
    await log.close()
    assert log.recovered is not None
    assert log.recovered["unsigned"] == {"from": 12, "to": 13}
    assert log.recovered["torn_tail"]["offset"] == len("".join(lines[:13]))
    aside = json.loads((tmp_path / log.recovered["set_aside"]).read_text())
    assert base64.b64decode(aside["base64"]) == torn

    code, printed = _verify(capsys, str(path), "--keys", str(tmp_path / "keys"))
    assert code == 3
    assert "records 12-13 after the checkpoint at seq 11 were not signed until the restart at seq 14" in printed
    assert (
        f"cut off an incomplete last line (a write never acknowledged, {len(torn)} bytes at offset "
        f"{len(''.join(lines[:13]))}) and kept it in {log.recovered['set_aside']}"
    ) in printed


async def test_a_checkpoint_is_due_checkpoint_seconds_after_the_oldest_unsigned_record(
    tmp_path: Path, keys: KeyRing
) -> None:
    """An idle runtime still signs what it wrote, and a burst never outgrows the interval."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, keys, to_stdout=False, checkpoint_every=4, checkpoint_seconds=0.5, stream=io.StringIO())
    await log.start()
    await log.record(type="operation", action="ping", result="success")
    assert json.loads(path.read_text().splitlines()[-1])["type"] == "operation"  # acknowledged, not signed yet
    deadline = time.monotonic() + 10
    while json.loads(path.read_text().splitlines()[-1])["type"] != "checkpoint":
        assert time.monotonic() < deadline, "no checkpoint came for the idle record"
        await asyncio.sleep(0.02)  # polling for the timer's checkpoint; no record is written meanwhile
    signed = _records(path.read_text().splitlines())[-1]
    assert (signed["seq"], signed["details"]["reason"]) == (3, "interval")
    assert (signed["details"]["every"], signed["details"]["seconds"]) == (4, 0.5)

    # Ten records queued at once are one batch, and still signed every 4 records.
    await asyncio.gather(*(log.record(type="operation", action="ping", result="success") for _ in range(10)))
    await log.close()
    result = verify_lines(path.read_text().splitlines(keepends=True), keys)
    assert result.ok, result.describe()


async def test_a_key_directory_without_an_audit_key_still_serves(
    tmp_path: Path, aiohttp_client: AiohttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent whose key Secret predates audit keys: it serves, signs with an ephemeral key it
    announces on stdout, and verify trusts that key only from the log collector's copy."""
    config = make_layout(tmp_path / "agent")
    keys_dir = tmp_path / "agent" / "keys"
    for path in keys_dir.glob(f"{AUDIT_PREFIX}*"):
        path.unlink()
    active = json.loads((keys_dir / "active.json").read_text())
    del active["audit"]
    (keys_dir / "active.json").write_text(json.dumps(active))
    capsys.readouterr()

    client = await aiohttp_client(create_app(Settings.load(str(config)), BUILTINS))
    assert (await client.get("/healthz")).status == 200
    refused = await client.post("/v1/operations/ping", json={}, headers={"Authorization": "Bearer nonsense"})
    assert refused.status == 401
    await client.close()
    captured = capsys.readouterr()
    assert "has no audit key" in captured.err
    copy = tmp_path / "stdout.log"
    copy.write_text(captured.out)
    trail = str(tmp_path / "agent" / "data" / "audit.log")

    code, printed = _verify(capsys, trail, "--keys", str(keys_dir))
    assert code == 2
    assert "has no audit key" in printed
    assert runtime_cli(["init", str(tmp_path / "other")]) == 0
    code, printed = _verify(capsys, trail, "--keys", str(tmp_path / "other" / "keys"))
    assert code == 1
    assert "checkpoint signed with the ephemeral key" in printed
    code, printed = _verify(capsys, trail, "--checkpoints", str(copy))
    assert code == 0, printed
    assert "trusted from the checkpoint copy" in printed


async def test_rotated_audit_keys_keep_old_checkpoints_verifiable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.log"
    first = new_key_files(SigningAlgorithm.RS256)
    write_key_files(tmp_path / "v1", first)
    await _write_trail(path, KeyRing.load(tmp_path / "v1"), count=3)
    write_key_files(tmp_path / "v2", new_key_files(SigningAlgorithm.RS256, regular_files(tmp_path / "v1")))
    rotated = KeyRing.load(tmp_path / "v2")
    assert len(rotated.audit) == 2
    await _write_trail(path, rotated, count=3)
    jwks = _export_keys(tmp_path / "v2", tmp_path / "keys.json")
    kids = {r["details"]["kid"] for r in _records(path.read_text().splitlines()) if r["type"] == "checkpoint"}
    assert kids == set(rotated.audit)
    code, printed = _verify(capsys, str(path), "--public-keys", str(jwks))
    assert code == 0, printed


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_change_to_a_trail_verifies_and_none_crashes_verify(data: st.DataObject) -> None:
    """Any byte changed, any line dropped, repeated or moved: never verified, never an exception."""
    trail, keys = _FUZZ_TRAIL()
    lines = trail.splitlines(keepends=True)
    kind = data.draw(st.sampled_from(["byte", "drop", "repeat", "move"]))
    if kind == "byte":
        position = data.draw(st.integers(0, len(trail) - 1))
        value = data.draw(st.integers(0, 255).filter(lambda byte: byte != trail[position]))
        changed = trail[:position] + bytes([value]) + trail[position + 1 :]
    else:
        index = data.draw(st.integers(0, len(lines) - 1))
        other = data.draw(st.integers(0, len(lines) - 1).filter(lambda i: i != index))
        changed_lines = list(lines)
        if kind == "drop":
            del changed_lines[index]
        elif kind == "repeat":
            changed_lines.insert(other, lines[index])
        else:
            changed_lines.insert(other, changed_lines.pop(index))
        changed = b"".join(changed_lines)
    result = verify_trail(changed, keys)
    assert result.status is not Status.VERIFIED, (kind, result.describe())


class _FuzzTrail:
    """One trail for every example (hypothesis runs the test body many times)."""

    def __init__(self) -> None:
        self.made: tuple[bytes, KeyRing] | None = None

    def __call__(self) -> tuple[bytes, KeyRing]:
        if self.made is None:
            import tempfile

            with tempfile.TemporaryDirectory() as directory:
                root = Path(directory)
                write_key_files(root / "keys", new_key_files(SigningAlgorithm.EDDSA))
                ring = KeyRing.load(root / "keys")
                asyncio.run(_write_trail(root / "audit.log", ring, count=6))
                self.made = ((root / "audit.log").read_bytes(), ring)
        return self.made


_FUZZ_TRAIL = _FuzzTrail()


async def test_no_acknowledged_request_loses_its_record_on_kill_9(tmp_path: Path) -> None:
    config = make_layout(tmp_path / "agent")
    with live_runtime(config) as (server, base):
        appender = _appenders(server.pid)
        # SIGKILL mid-load: no chance to flush anything.
        answered = await load_then(base, login(base), 32, 1.5, lambda: server.send_signal(signal.SIGKILL))
        server.wait()
    # Its appender sees its stdin end and exits: nothing of the old runtime writes on.
    assert len(appender) == 1
    assert _ends(appender[0]), "the appender outlived its runtime"
    acknowledged = [request_id for request_id, status in answered.items() if status == 200]
    assert len(acknowledged) > 100, "the load was too light to show anything"
    data = (tmp_path / "agent" / "data" / "audit.log").read_bytes()
    complete = [line for line in data.decode().splitlines(keepends=True) if line.endswith("\n")]
    # The id the client sent (X-Request-ID) is kept as details.client_request_id beside the server's.
    recorded = {json.loads(line).get("details", {}).get("client_request_id") for line in complete}
    assert [request_id for request_id in acknowledged if request_id not in recorded] == []
    result = verify_trail(data, KeyRing.load(tmp_path / "agent" / "keys"))
    assert result.status is Status.UNSIGNED, result.describe()  # intact; only the tail since the last checkpoint


def _appenders(server: int) -> list[int]:
    """The audit appender processes the runtime ``server`` started (its children running it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == server and b"audit_appender.py" in command:
            found.append(int(entry.name))
    return found


def _ends(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` exits (or is a zombie: exited, not yet reaped) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


async def test_a_killed_appender_fails_its_batch_closed_and_is_replaced(tmp_path: Path) -> None:
    """kill -9 of the process that appends and fsyncs, under load: the requests of the batch it
    held are refused (503, never a 200 without a record), a new appender takes over, every
    acknowledged request's record is in the trail, and the trail verifies to its final checkpoint."""
    config = make_layout(tmp_path / "agent")
    with live_runtime(config) as (server, base):
        (first,) = _appenders(server.pid)
        started = time.monotonic()  # after the first appender's start

        def kill_the_appender() -> None:
            # Its replacement may start at once only RETRY_SECONDS after the first appender did
            # (the load alone lasts longer); otherwise the last requests would rightly be 503s.
            assert time.monotonic() - started >= audit_module.RETRY_SECONDS
            os.kill(first, signal.SIGKILL)

        answered = await load_then(base, login(base), 16, 1.0, kill_the_appender, then_seconds=1.5)
        replacements = _appenders(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    assert replacements
    assert first not in replacements
    statuses = sorted(set(answered.values()))
    assert statuses == [200, 503], statuses  # the batch in flight refused, nothing else went wrong
    last_of_each_worker = {request_id[:3]: status for request_id, status in sorted(answered.items())}
    assert set(last_of_each_worker.values()) == {200}, "the runtime did not recover from the kill"
    lines = (tmp_path / "agent" / "data" / "audit.log").read_text().splitlines(keepends=True)
    recorded = {json.loads(line).get("details", {}).get("client_request_id") for line in lines}
    acknowledged = [request_id for request_id, status in answered.items() if status == 200]
    assert [request_id for request_id in acknowledged if request_id not in recorded] == []
    refused = [request_id for request_id, status in answered.items() if status == 503]
    assert [request_id for request_id in refused if request_id in recorded] == []  # rolled back, not kept
    result = verify_lines(lines, KeyRing.load(tmp_path / "agent" / "keys"))
    assert result.status is Status.VERIFIED, result.describe()


def _ready(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def _ping(base: str, token: str) -> int:
    request = urllib.request.Request(
        f"{base}/v1/operations/ping", data=b"{}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


async def test_an_appender_killed_between_batches_is_replaced(tmp_path: Path) -> None:
    """The appender dies while nothing is being written (uvloop has closed its pipes by the time
    the next batch comes): that batch is refused with 503, the next is written by a new one."""
    config = make_layout(tmp_path / "agent")
    with live_runtime(config) as (server, base):
        token = login(base)
        (first,) = _appenders(server.pid)
        os.kill(first, signal.SIGKILL)
        assert _ends(first)
        assert _ping(base, token) == 503
        # Unready meanwhile; the log tries on its own and is ready again with no request.
        deadline = time.monotonic() + 10
        while _ready(base) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_ready(base), _ping(base, token), _ping(base, token)] == [200, 200, 200]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    lines = (tmp_path / "agent" / "data" / "audit.log").read_text().splitlines(keepends=True)
    assert [json.loads(line)["action"] for line in lines].count("ping") == 2
    result = verify_lines(lines, KeyRing.load(tmp_path / "agent" / "keys"))
    assert result.status is Status.VERIFIED, result.describe()


async def test_the_audit_is_ready_again_without_a_request_once_a_new_appender_writes(
    tmp_path: Path, keys: KeyRing
) -> None:
    """An unready pod gets no requests to show its trail writable again: after a failed batch,
    the log tries again on its own (here nothing is waiting for a checkpoint)."""
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, stream=io.StringIO())
    await log.start()  # the start checkpoint: no record waits for a signature
    appender = log._appender
    assert appender is not None
    os.kill(appender.pid, signal.SIGKILL)
    assert await appender.wait() == -signal.SIGKILL
    with pytest.raises(AuditUnavailableError):
        await log.record(type="operation", action="ping", result="success", request_id="lost")
    assert not log.healthy
    assert await _healthy_again(log)
    await log.close()
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    assert [record["action"] for record in records] == ["checkpoint", "unavailable", "checkpoint"]
    assert records[1]["details"]["refused_records"] == 1
    assert verify_lines(lines, keys).ok


@pytest.mark.parametrize("seen", [False, True], ids=["death-unseen", "death-seen-by-a-refused-record"])
async def test_the_final_checkpoint_is_written_when_the_appender_died_just_before_shutdown(
    tmp_path: Path, keys: KeyRing, seen: bool
) -> None:
    """Shutdown right after the appender died (unnoticed yet, or noticed by a record it refused
    less than RETRY_SECONDS ago, when no new appender may start yet): the final checkpoint goes
    to a new appender at once, after the outage's record, so the trail still ends clean."""
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, stream=io.StringIO())
    await log.start()
    await log.record(type="operation", action="ping", result="success", request_id="kept")
    appender = log._appender
    assert appender is not None
    os.kill(appender.pid, signal.SIGKILL)
    assert await appender.wait() == -signal.SIGKILL
    if seen:
        with pytest.raises(AuditUnavailableError):
            await log.record(type="operation", action="ping", result="success", request_id="lost")
    await log.close()
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    expected = [("checkpoint", None), ("ping", "kept")] + [("unavailable", None)] * seen + [("checkpoint", None)]
    assert [(record["action"], record.get("request_id")) for record in records] == expected
    assert records[-1]["details"]["reason"] == "final"
    if seen:
        assert records[2]["details"]["refused_records"] == 1
    result = verify_lines(lines, keys)
    assert result.status is Status.VERIFIED, result.describe()


# An appender that writes its second batch to the file and dies before it is fsynced and answered
# (the worst moment to die); the appenders after it are the real one.
_DYING_APPENDER = """
import importlib.util, os, runpy, sys
real = os.path.join(os.path.dirname(sys.argv[0]), "real.py")
marker = os.path.join(os.path.dirname(sys.argv[0]), "died")
if os.path.exists(marker):
    sys.argv[0] = real
    runpy.run_path(real, run_name="__main__")
    sys.exit(0)
open(marker, "w").close()
spec = importlib.util.spec_from_file_location("appender", real)
appender = importlib.util.module_from_spec(spec)
spec.loader.exec_module(appender)  # the protocol's own structs and reads, not a copy of them
def answer_after(writes):
    for _ in range(writes):
        _, size, copied = appender.HEADER.unpack(appender._read_exactly(appender.HEADER.size))
        os.write(int(sys.argv[1]), appender._read_exactly(size + copied)[:size])
        yield
for count, _ in enumerate(answer_after(2)):
    if count == 1:
        os._exit(9)
    os.fsync(int(sys.argv[1]))
    os.write(1, appender.ANSWER.pack(0))
"""


@pytest.mark.parametrize("cut_back_fails", [False, True], ids=["cut-by-the-runtime", "cut-by-the-next-appender"])
async def test_a_batch_written_by_an_appender_that_then_died_is_cut_from_the_trail(
    tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch, cut_back_fails: bool
) -> None:
    """Its records were in the file but never answered: the caller gets AuditUnavailableError,
    the bytes are cut away (by the runtime once the appender is gone for certain; should that
    fail, by the next appender before it writes), the audit is unhealthy until the trail takes a
    write again, and the chain goes on from the last answered batch, with a record of the outage."""
    scripts = tmp_path / "appenders"
    scripts.mkdir()
    (scripts / "dying.py").write_text(_DYING_APPENDER)
    (scripts / "real.py").write_bytes(audit_module.APPENDER.read_bytes())
    monkeypatch.setattr(audit_module, "APPENDER", scripts / "dying.py")
    if cut_back_fails:
        monkeypatch.setattr(AuditLog, "_cut_back", lambda self: None)
    path = tmp_path / "audit.log"
    log = AuditLog(path, keys, to_stdout=False, stream=io.StringIO())
    await log.start()  # the first batch: the start checkpoint
    with pytest.raises(AuditUnavailableError):
        await log.record(type="operation", action="ping", result="success", request_id="lost")
    assert not log.healthy
    assert (b'"lost"' in path.read_bytes()) is cut_back_fails
    assert await _healthy_again(log)
    await log.record(type="operation", action="ping", result="success", request_id="kept")
    await log.close()
    lines = path.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    assert [(record["action"], record.get("request_id")) for record in records] == [
        ("checkpoint", None),
        ("unavailable", None),
        ("ping", "kept"),
        ("checkpoint", None),
    ]
    assert records[1]["details"]["refused_records"] == 1
    assert verify_lines(lines, keys).ok


# An appender on a full disk: every batch is answered ENOSPC, and counted in a file beside it.
_FULL_DISK_APPENDER = """
import errno, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("appender", os.path.join(os.path.dirname(sys.argv[0]), "real.py"))
appender = importlib.util.module_from_spec(spec)
spec.loader.exec_module(appender)
tries = os.path.join(os.path.dirname(sys.argv[0]), "tries")
while (header := appender._read_exactly(appender.HEADER.size)) is not None:
    _, size, copied = appender.HEADER.unpack(header)
    appender._read_exactly(size + copied)
    with open(tries, "a") as counter:
        counter.write("x")
    os.write(1, appender.ANSWER.pack(errno.ENOSPC))
"""


async def test_a_full_disk_keeps_the_audit_unready_and_is_tried_once_a_second_not_in_a_loop(
    tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write refused (ENOSPC), with a checkpoint overdue all along: the log tries again once
    every RETRY_SECONDS, not as fast as the appender answers; an empty fsync does not count as a
    write (the retry carries the outage's record), so the audit stays unready."""
    scripts = tmp_path / "appenders"
    scripts.mkdir()
    (scripts / "full.py").write_text(_FULL_DISK_APPENDER)
    (scripts / "real.py").write_bytes(audit_module.APPENDER.read_bytes())
    path = tmp_path / "audit.log"
    log = AuditLog(path, keys, to_stdout=False, checkpoint_seconds=0.5, stream=io.StringIO())
    await log.start()
    # A record on disk whose checkpoint falls due half a second later, when the disk is full.
    await log.record(type="operation", action="ping", result="success")
    monkeypatch.setattr(audit_module, "APPENDER", scripts / "full.py")
    assert log._appender is not None
    await log._appender.stop()  # the next batch starts the full-disk appender
    log._appender = None
    log._started_appender = -audit_module.RETRY_SECONDS
    with pytest.raises(AuditUnavailableError, match="No space left"):
        await log.record(type="operation", action="ping", result="success")
    watched = 3 * audit_module.RETRY_SECONDS
    await asyncio.sleep(watched)  # the span of time whose tries are counted, not a condition
    tries = len((scripts / "tries").read_text())
    assert 2 <= tries <= 2 + watched / audit_module.RETRY_SECONDS, tries
    assert not log.healthy
    with pytest.raises(OSError, match="No space left"):  # its final checkpoint cannot be written either
        await log.close()


async def test_a_stopped_appender_is_killed_after_its_deadline_and_replaced(
    tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP (or a disk that never answers): the batch is refused after ANSWER_SECONDS instead
    of its requests waiting for ever, the stopped appender is killed, and a new one takes over."""
    monkeypatch.setattr(audit_module, "ANSWER_SECONDS", 0.5)
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, stream=io.StringIO())
    await log.start()
    appender = log._appender
    assert appender is not None
    os.kill(appender.pid, signal.SIGSTOP)
    with pytest.raises(AuditUnavailableError, match="did not answer"):
        await log.record(type="operation", action="ping", result="success", request_id="stuck")
    assert appender.returncode == -signal.SIGKILL
    assert await _healthy_again(log)
    await log.record(type="operation", action="ping", result="success", request_id="kept")
    await log.close()
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    assert [json.loads(line).get("request_id") for line in lines] == [None, None, "kept", None]
    assert verify_lines(lines, keys).ok


async def test_an_answer_read_after_its_deadline_rang_keeps_the_batch(tmp_path: Path, keys: KeyRing) -> None:
    """The race a busy loop can make: the appender has answered 0 (the batch is on disk, and its
    copy shipped to the log collector), but the loop runs the batch's deadline before it reads
    the answer. The deadline kills the appender at once; once the appender's end is read, its
    answer counts: the record is kept and its caller answered, not cut from the file, which would
    contradict the copy the collector holds."""
    log, appender = await _log_with_a_stopped_appender(tmp_path / "audit.log", keys)
    pipes = appender._pipes
    try:
        record = asyncio.ensure_future(log.record(type="operation", action="ping", result="success", request_id="late"))
        while pipes.in_flight is None:
            await asyncio.sleep(0)
        batch = pipes.in_flight
    finally:
        os.kill(appender.pid, signal.SIGCONT)  # it reads the batch, writes it and answers
    stdout = appender._transport.get_pipe_transport(1)
    assert stdout is not None
    # The loop is held here (no await) until the answer waits in the pipe; the deadline rings first.
    assert select.select([stdout.get_extra_info("pipe")], [], [], 10)[0]
    pipes.time_out(batch)
    assert (await asyncio.wait_for(record, 10))["request_id"] == "late"
    assert appender.returncode == -signal.SIGKILL  # by the deadline, at once
    await log.close()
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    assert [json.loads(line).get("request_id") for line in lines] == [None, "late", None]
    assert verify_lines(lines, keys).ok


async def _log_with_a_stopped_appender(path: Path, keys: KeyRing) -> tuple[AuditLog, _AppendProcess]:
    """A started log whose appender is SIGSTOPped: it reads nothing and answers nothing until let go."""
    log = AuditLog(path, keys, to_stdout=False, stream=io.StringIO())
    await log.start()
    appender = log._appender
    assert appender is not None
    assert log._writer is not None
    os.kill(appender.pid, signal.SIGSTOP)
    return log, appender


@pytest.mark.parametrize(
    "let_go",
    [None, "before-its-deadline", "after-its-deadline"],
    ids=["stalled-for-good", "let-go-before", "let-go-after"],
)
async def test_a_batch_whose_writer_was_cancelled_is_settled_before_the_final_checkpoint(
    tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch, let_go: str | None
) -> None:
    """The writer is cancelled (a loop's shutdown cancels every task, callers too) while its batch
    waits on an appender that has stalled. close() is not left waiting behind it: the batch's own
    deadline, not a new one, kills the stalled appender, so it cannot write the batch later. Then
    the batch's fate decides: kept when the appender wrote and answered it before its deadline,
    else cut from the file, the waiting caller refused, every record of it counted as lost, and the
    chain rolled back, so the final checkpoint chains after what is on disk and the trail verifies.
    A record queued behind the batch is written before the final checkpoint, not left waiting."""
    monkeypatch.setattr(audit_module, "ANSWER_SECONDS", 0.5)
    log, appender = await _log_with_a_stopped_appender(tmp_path / "audit.log", keys)

    def ping(request_id: str) -> asyncio.Future[dict[str, Any]]:
        return asyncio.ensure_future(
            log.record(type="operation", action="ping", result="success", request_id=request_id)
        )

    waiting, cancelled = ping("in-flight"), ping("caller-cancelled")  # one batch
    while appender._pipes.in_flight is None:
        await asyncio.sleep(0)
    queued = ping("queued")
    while not log._queue:  # the queued record's task puts it behind the batch in flight
        await asyncio.sleep(0)
    assert log._writer is not None
    log._writer.cancel()
    cancelled.cancel()
    if let_go == "after-its-deadline":
        while not appender._pipes.overdue:
            await asyncio.sleep(0.01)
    if let_go is not None:
        with contextlib.suppress(ProcessLookupError):  # after the deadline it may be gone already
            os.kill(appender.pid, signal.SIGCONT)
    try:
        await asyncio.wait_for(log.close(), 20 * audit_module.ANSWER_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(appender.pid, signal.SIGCONT)
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    kept = let_go == "before-its-deadline"
    middle = [("ping", "in-flight"), ("ping", "caller-cancelled")] if kept else [("unavailable", None)]
    assert [(record["action"], record.get("request_id")) for record in records] == [
        ("checkpoint", None),
        *middle,
        ("ping", "queued"),
        ("checkpoint", None),
    ]
    assert records[-1]["details"]["reason"] == "final"
    assert verify_lines(lines, keys).ok
    # Bounded: a batch left unsettled would leave its caller waiting for ever.
    assert (await asyncio.wait_for(queued, 5))["request_id"] == "queued"
    if kept:
        assert (await asyncio.wait_for(waiting, 5))["request_id"] == "in-flight"
    else:
        assert appender.returncode == -signal.SIGKILL
        assert records[1]["details"]["refused_records"] == 2  # the cancelled caller's record is lost too
        with pytest.raises(AuditUnavailableError):
            await asyncio.wait_for(waiting, 5)


@pytest.mark.parametrize(
    "writer_cancelled_first", [True, False], ids=["while-it-settles", "while-it-waits-on-the-writer"]
)
async def test_a_cancelled_close_kills_the_appender_and_answers_every_caller(
    tmp_path: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch, writer_cancelled_first: bool
) -> None:
    """A shutdown's deadline cancels close() while a batch waits on a stalled appender: either
    close() settles a cancelled writer's batch, or it still waits on the writer, which it
    cancels. Either way the cancel is close()'s to raise, not swallowed: the appender is killed
    then and there (it would outlive the runtime: it runs in its own session), the unanswered
    batch is cut from the file, its caller and the one queued behind it are refused, and the
    trail is left as after a crash (no final checkpoint), to be verified and continued."""
    monkeypatch.setattr(audit_module, "ANSWER_SECONDS", 30.0)
    log, appender = await _log_with_a_stopped_appender(tmp_path / "audit.log", keys)
    try:
        waiting = asyncio.ensure_future(log.record(type="operation", action="ping", result="success"))
        while appender._pipes.in_flight is None:
            await asyncio.sleep(0)
        queued = asyncio.ensure_future(log.record(type="operation", action="ping", result="success"))
        while not log._queue:  # the queued record's task puts it behind the batch in flight
            await asyncio.sleep(0)
        if writer_cancelled_first:
            assert log._writer is not None
            log._writer.cancel()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(log.close(), 1)
        assert appender.returncode == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(appender.pid, signal.SIGCONT)
    for caller in (waiting, queued):
        with pytest.raises(AuditUnavailableError):
            await asyncio.wait_for(caller, 5)
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    assert [json.loads(line)["action"] for line in lines] == ["checkpoint"]  # the start's
    result = verify_lines(lines, keys)
    assert result.status is Status.UNSIGNED, result.describe()  # intact, without its final checkpoint
    again = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, stream=io.StringIO())
    await again.start()
    await again.record(type="operation", action="ping", result="success", request_id="after")
    await again.close()
    lines = (tmp_path / "audit.log").read_text().splitlines(keepends=True)
    assert [json.loads(line).get("request_id") for line in lines][-2] == "after"
    assert verify_lines(lines, keys).ok


async def _healthy_again(log: AuditLog) -> bool:
    """Whether the log takes writes again within a few of its retries, with no record sent."""
    deadline = time.monotonic() + 10 * audit_module.RETRY_SECONDS
    while not log.healthy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return log.healthy


async def test_hostile_text_stays_on_one_line(tmp_path: Path, keys: KeyRing) -> None:
    """Separators that line-based tools split on (U+2028, U+0085, \\r) and NUL never break a record."""
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, stream=io.StringIO())
    await log.start()
    hostile = "a\u2028b\x85c\rd\x00e\U0001f600f\ud800"
    await log.record(type="authn", action="login", result="failure", actor=hostile, details={"x": hostile})
    await log.close()
    data = (tmp_path / "audit.log").read_bytes()
    assert data.isascii()
    lines = data.decode().splitlines(keepends=True)
    assert len(lines) == 3  # the start checkpoint, the record and the final checkpoint
    assert json.loads(lines[1])["actor"] == hostile
    assert verify_lines(lines, keys).ok


@pytest.mark.parametrize("seconds", [5e-05, 1e-07, 1e16], ids=repr)
async def test_checkpoints_verify_whatever_float_their_interval_is(
    tmp_path: Path, keys: KeyRing, seconds: float
) -> None:
    """Records are written by orjson, checkpoints by canonical() (the standard library), whose
    bytes their signature covers and verify re-serialises from the collector's copy: intervals
    that the two write differently (5e-05 against 0.00005) still verify, trail and copy."""
    copy = io.StringIO()
    log = AuditLog(tmp_path / "audit.log", keys, to_stdout=False, checkpoint_every=2, checkpoint_seconds=seconds,
                   stream=copy)  # fmt: skip
    await log.start()
    for index in range(3):
        await log.record(type="operation", action="ping", result="success", actor=f"user{index}", details={"ms": 1e-07})
    await log.close()
    result = verify_trail((tmp_path / "audit.log").read_bytes(), keys, copy.getvalue().encode())
    assert result.ok, result.describe()

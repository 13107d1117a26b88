"""A tamper-evident, durable audit trail.

Each record is one JSON line carrying its sequence number, the previous record's SHA-256 and its
own, so any edit, deletion, insertion or reordering breaks the chain at a named record. Every
``checkpoint_every`` records (or ``checkpoint_seconds``) a checkpoint record signs the chain head
with the runtime's signing key, so the chain cannot be silently rewritten from scratch either.

Writes are group-committed: records queue up, one writer appends a batch and fsyncs once, and
only then are the callers' awaits released. A request is answered after its record is on disk, so
a crash never loses the record of an acknowledged request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from agent_contract.config import SigningAlgorithm
from agent_contract.keyfiles import KeyRing, SigningKey

GENESIS = "0" * 64
MAX_BATCH = 512
RECENT = 1000


def canonical(record: dict[str, Any]) -> bytes:
    # ASCII only: no raw U+2028, U+0085 or the like that a log pipeline would take for a line break.
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(record: dict[str, Any]) -> str:
    """The hash of a record: over every field but ``hash`` itself (``prev`` included)."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def sign(key: SigningKey, message: bytes) -> bytes:
    if key.algorithm is SigningAlgorithm.EDDSA:
        return bytes(key.private.sign(message))
    if key.algorithm is SigningAlgorithm.RS256:
        return bytes(key.private.sign(message, padding.PKCS1v15(), hashes.SHA256()))
    mac = hmac.HMAC(key.private, hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def verify_signature(key: SigningKey, message: bytes, signature: bytes) -> bool:
    try:
        verifier = key.verifier
        if isinstance(verifier, ed25519.Ed25519PublicKey):
            verifier.verify(signature, message)
        elif isinstance(verifier, rsa.RSAPublicKey):
            verifier.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            mac = hmac.HMAC(verifier, hashes.SHA256())
            mac.update(message)
            mac.verify(signature)
    except InvalidSignature:
        return False
    return True


def _checkpoint_message(upto: int, head: str) -> bytes:
    return f"audit-checkpoint:{upto}:{head}".encode()


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Pending:
    record: dict[str, Any]
    done: asyncio.Future[dict[str, Any]]


class AuditLog:
    def __init__(
        self,
        path: str | Path,
        keys: KeyRing | None,
        to_stdout: bool = True,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        on_write: Callable[[float, int], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.keys = keys
        self.to_stdout = to_stdout
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.on_write = on_write  # (seconds a batch took, records in it), for metrics
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._fd = -1
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._writer: asyncio.Task[None] | None = None
        self.healthy = True

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    def _recover(self) -> None:
        """Continues the chain of an existing file; a torn last line (a crash mid-write, never
        acknowledged) is cut off."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        position = 0
        for line in data.splitlines(keepends=True):
            position += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            self._seq, self._head = int(record["seq"]), str(record["hash"])
            self._since_checkpoint = 0 if record.get("type") == "checkpoint" else self._since_checkpoint + 1
            self.recent.append(record)
            good_end = position
        if good_end < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)

    async def close(self) -> None:
        """Flushes what is queued, writes a final checkpoint and closes the file."""
        if self._writer is None:
            return
        await self._queue.join()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        if self._since_checkpoint:
            lines = [self._checkpoint()]
            await asyncio.to_thread(self._append, lines)
        os.close(self._fd)
        self._fd = -1

    # --- writing ----------------------------------------------------------------------------------

    async def record(
        self,
        *,
        type: str,
        action: str,
        result: str,
        actor: str | None = None,
        resource: str | None = None,
        client_ip: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Queues a record and returns once it is on disk (fsynced)."""
        if self._writer is None or self._writer.done():
            raise RuntimeError("the audit log is not running")
        record = {
            "time": utc_now(),
            "type": type,
            "actor": actor,
            "action": action,
            "resource": resource,
            "result": result,
            "client_ip": client_ip,
            "request_id": request_id,
            "trace_id": trace_id,
            "details": details or {},
        }
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(record, done))
        return await done

    def _chain(self, record: dict[str, Any]) -> str:
        self._seq += 1
        record["seq"] = self._seq
        record["prev"] = self._head
        body = canonical(record)  # serialised once: hashed, then written with the hash appended
        record["hash"] = self._head = hashlib.sha256(body).hexdigest()
        self.recent.append(record)
        return f'{body[:-1].decode()},"hash":"{record["hash"]}"}}\n'

    def _checkpoint(self) -> str:
        details: dict[str, Any] = {"upto": self._seq, "head": self._head}
        if self.keys is not None:
            signer = self.keys.signer
            signature = sign(signer, _checkpoint_message(self._seq, self._head))
            details.update(kid=signer.kid, alg=signer.algorithm.value, signature=base64.b64encode(signature).decode())
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        record = {
            "time": utc_now(),
            "type": "checkpoint",
            "action": "checkpoint",
            "result": "success",
            "details": details,
        }
        return self._chain(record)

    def _append(self, lines: list[str]) -> None:
        data = "".join(lines).encode()
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        if self.to_stdout:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            lines = [self._chain(item.record) for item in batch]
            self._since_checkpoint += len(batch)
            due = time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
            if self._since_checkpoint >= self.checkpoint_every or due:
                lines.append(self._checkpoint())
            try:
                await asyncio.to_thread(self._append, lines)
            except OSError as error:
                self.healthy = False
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(error)
            else:
                self.healthy = True
                for item in batch:
                    if not item.done.done():
                        item.done.set_result(item.record)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if self.on_write is not None:
                self.on_write(time.perf_counter() - started, len(batch))


# --- verification -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    checkpoints: int
    signatures_checked: bool
    first_bad_line: int | None = None
    first_bad_seq: int | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.ok:
            signed = "signatures verified" if self.signatures_checked else "signatures NOT checked (no keys given)"
            return f"ok: {self.records} records, {self.checkpoints} checkpoints, chain intact, {signed}"
        return f"TAMPERED at line {self.first_bad_line} (record seq {self.first_bad_seq}): {self.reason}"


def verify_lines(lines: Iterable[str], keys: KeyRing | None = None) -> Verification:
    """Checks the chain and the checkpoints; names the first record that does not fit."""
    expected_seq, head = 1, GENESIS
    records = checkpoints = 0

    def bad(number: int, seq: Any, reason: str) -> Verification:
        return Verification(
            False, records, checkpoints, keys is not None, number, seq if isinstance(seq, int) else None, reason
        )

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            return bad(number, None, "empty line")
        try:
            record = json.loads(line)
        except ValueError:
            return bad(number, None, "not a JSON record")
        if not isinstance(record, dict):
            return bad(number, None, "not a JSON object")
        seq = record.get("seq")
        if seq != expected_seq:
            return bad(
                number,
                seq,
                f"sequence {seq} where {expected_seq} was expected (a record was removed, inserted or moved)",
            )
        if record.get("prev") != head:
            return bad(number, seq, "does not follow the previous record (prev hash differs)")
        if record.get("hash") != chain_hash(record):
            return bad(number, seq, "content does not match its hash (the record was edited)")
        if record.get("type") == "checkpoint":
            details = record.get("details") or {}
            if details.get("upto") != seq - 1 or details.get("head") != head:
                return bad(number, seq, "checkpoint does not describe the chain before it")
            if keys is not None:
                key = keys.signing.get(str(details.get("kid")))
                if key is None:
                    return bad(number, seq, f"checkpoint signed by unknown key {details.get('kid')!r}")
                try:
                    signature = base64.b64decode(str(details.get("signature", "")), validate=True)
                except ValueError:
                    return bad(number, seq, "checkpoint signature is not base64")
                if not verify_signature(key, _checkpoint_message(seq - 1, head), signature):
                    return bad(number, seq, "checkpoint signature does not verify")
            checkpoints += 1
        else:
            records += 1
        head, expected_seq = record["hash"], expected_seq + 1
    return Verification(True, records, checkpoints, keys is not None)

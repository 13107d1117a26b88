"""A tamper-evident, durable audit trail that an auditor can check with public keys only.

Each record is one JSON line carrying its sequence number, the previous record's SHA-256 and its
own, so any edit, deletion, insertion or reordering breaks the chain at a named record. The chain
alone is unkeyed (anyone can re-hash it), so checkpoints sign it: a checkpoint record carries the
chain head and an Ed25519 signature by the agent's dedicated audit key (``audit-<kid>`` in the key
directory, never the token key). A checkpoint is written when the runtime starts, after
``checkpoint_every`` records, ``checkpoint_seconds`` after the oldest unsigned record, and a
``final`` one on a clean shutdown; each carries that interval, so ``verify`` knows how long an
unsigned span may be. Every checkpoint is also printed to stdout as a ``{"audit_checkpoint": ...}``
line, so the log collector holds a copy that a later rewrite of the file cannot reach.

Writes are group-committed: records queue up, one writer chains a batch, a small process of its
own (``audit_appender.py``) appends it and fsyncs once, and only then are the callers' awaits
released. A request is answered after its record is on disk, so
a crash never loses the record of an acknowledged request.

At start-up nothing is discarded silently: an unreadable line in the middle stays where it is
(later records are kept), a torn last line (a crash mid-write, never acknowledged) is cut off, and
both are copied to ``<file>.damaged-<time>`` with their offsets and described in a ``recover``
record, which ``verify`` reports.

A key directory without an audit key (made by an older operator) still starts: checkpoints are
then signed with an ephemeral key whose public half is in every checkpoint, which proves nothing
on its own; ``verify`` accepts it only when the log collector's copy announces the same key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import datetime
import enum
import errno
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeGuard, cast

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent_contract.keyfiles import KeyRing, public_jwk
from agent_runtime.audit_appender import ANSWER, HEADER

GENESIS = "0" * 64
MAX_BATCH = 512
RETRY_SECONDS = 1.0  # after a failed write, how soon the trail is tried again with no request
# How long a batch may take before its appender is taken for stuck (stopped, or on a disk that no
# longer answers) and killed: its requests are then refused rather than left waiting.
ANSWER_SECONDS = 30.0
RECENT = 1000
FORMAT = 2  # of checkpoints; 1 (before audit keys) was signed with the token key
CHECKPOINT_LINE = "audit_checkpoint"  # the key of the checkpoint lines on stdout
# Clocks, queueing and fsync make a checkpoint a little later than its interval; an unsigned span
# longer than the interval by more than this did not come from the runtime.
SLACK_SECONDS = 10.0
_CONTEXT = b"eao-audit-checkpoint-v2\n"  # signatures over checkpoints are good for nothing else


class Reason(enum.StrEnum):
    START = "start"  # the runtime started: signs the trail as it found it
    INTERVAL = "interval"
    RECOVERY = "recovery"  # right after the record of what start-up found and set aside
    FINAL = "final"  # a clean shutdown: nothing follows but a restart


class Status(enum.IntEnum):
    """The outcome of a verification; the value is the exit code of ``agent-runtime audit verify``."""

    VERIFIED = 0  # every record signed within the interval, the trail ends with a final checkpoint
    FAILED = 1  # tampered, damaged, not signed by a given key, or beyond what the runtime writes
    UNSIGNED = 3  # intact and signed up to a point, but records after it are not (unclean shutdown?)


def canonical(record: dict[str, Any]) -> bytes:
    # ASCII only: no raw U+2028, U+0085 or the like that a log pipeline would take for a line break.
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _written(record: dict[str, Any]) -> bytes:
    """A record as it is written: canonical()'s bytes, from orjson (ten times faster, the same
    bytes for what records hold: ASCII strings, ints, short floats). Anything it would write
    differently takes the standard library's path: non-ASCII text (escaped there), a value orjson
    refuses (an int beyond 64 bits). The verifier hashes the line as written, so the two paths
    never have to agree byte for byte on a float's exponent."""
    try:
        body = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return canonical(record)
    return body if body.isascii() else canonical(record)


def chain_hash(record: dict[str, Any]) -> str:
    """The hash of a record: over every field but ``hash`` itself (``prev`` included)."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def checkpoint_message(record: dict[str, Any]) -> bytes:
    """What a checkpoint's signature covers: the whole record (its place in the chain, the head,
    the interval, the trail id, the reason) but the signature and the hash."""
    details = {k: v for k, v in dict(record.get("details") or {}).items() if k != "signature"}
    return _CONTEXT + canonical({**{k: v for k, v in record.items() if k != "hash"}, "details": details})


_second_text: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """The time as ``2026-12-03T13:02:20.445534Z`` (what datetime's isoformat writes, in UTC): the
    text of the current second is kept, since most records of a busy second share it."""
    global _second_text
    second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    cached = _second_text  # read once: recovery calls this from a thread
    if second != cached[0]:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{nanoseconds // 1000:06d}Z"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int  # not bool, which JSON's true would give


def _self_consistent(record: dict[str, Any], raw: bytes = b"") -> bool:
    """Whether a record's hash is its own. ``raw``, the line it was read from, saves serialising it
    again when it is as the runtime wrote it: the hash then is over the line without its ``hash``."""
    digest = record.get("hash")
    if not _is_int(record.get("seq")) or not isinstance(digest, str):
        return False
    body = raw.rstrip(b"\n")
    if body.endswith(f',"hash":"{digest}"}}'.encode()):
        unhashed = body[: -len(digest) - 11] + b"}"
        if hashlib.sha256(unhashed).hexdigest() == digest:
            return True
    try:
        return digest == chain_hash(record)
    except (ValueError, TypeError, RecursionError):
        return False


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """A line as a record, or None and why not."""
    body = raw.rstrip(b"\n")
    if not body.strip():
        return None, "empty line"
    try:
        record = json.loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, "not a JSON record"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    return record, ""


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line, on ``\\n`` only; the last may lack its newline (a torn write)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        yield start, data[start:end]
        start = end


@dataclass(frozen=True)
class _Span:
    """Bytes that start-up recovery set aside, as its ``recover`` record declares them."""

    offset: int
    length: int
    sha256: str
    recorded_at: int  # the seq of the recover record
    set_aside: str

    def covers(self, offset: int) -> bool:
        return self.offset <= offset < self.offset + self.length


def _declared_damage(record: dict[str, Any]) -> list[_Span]:
    if record.get("type") != "audit" or record.get("action") != "recover":
        return []
    details = record.get("details")
    if not isinstance(details, dict) or not isinstance(details.get("damaged"), list):
        return []
    spans = []
    for item in details["damaged"]:
        if isinstance(item, dict) and _is_int(item.get("offset")) and _is_int(item.get("length")):
            spans.append(
                _Span(
                    item["offset"],
                    item["length"],
                    str(item.get("sha256")),
                    record["seq"] if _is_int(record.get("seq")) else 0,
                    str(details.get("set_aside")),
                )
            )
    return spans


def _describe_bytes(offset: int, data: bytes, line: int | None = None) -> dict[str, Any]:
    described: dict[str, Any] = {"offset": offset, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if line is not None:
        described["line"] = line
    return described


@dataclass
class _Pending:
    record: dict[str, Any]
    done: asyncio.Future[dict[str, Any]]


APPENDER = Path(__file__).with_name("audit_appender.py")


class _Wake:
    """In the writer's queue: the time of a checkpoint or a retry may have come."""


_WAKE = _Wake()


class AuditUnavailableError(OSError):
    """A record that could not be made durable (the disk refused it, or the appender died): the
    request it belongs to must not be answered as done. It is not in the trail."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.errno, f"the audit trail cannot be written: {cause.strerror or cause}")


class AppenderGoneError(OSError):
    """The appender process ended (killed, or out of memory) before answering a batch."""

    batch_end: int | None = None  # the refused batch's end, when its deadline refused it (see time_out)


class _AppenderPipes(asyncio.SubprocessProtocol):
    """The appender's side of the pipes, as the loop delivers them: each answer on its stdout
    settles the one batch in flight. A protocol rather than asyncio's stream pair, a lock, a
    timeout and a shielded task per batch: those cost the loop 540 more bytecodes and 29 more
    calls a batch, and 9 to 28 µs more of its CPU (measured), on every batch a request waits for."""

    def __init__(self, size: int) -> None:
        self.size = size  # the trail's length, as far as this appender has answered
        self.in_flight: _Batch | None = None
        self.stdout_closed = False
        self.overdue = False  # a batch went unanswered past its deadline: its answers are out of step
        self.late: _Batch | None = None  # that batch, whose answer may yet be read (see time_out)
        self.exited = asyncio.get_running_loop().create_future()
        self.stdout_eof = asyncio.get_running_loop().create_future()  # every answer written has been read
        self._answer = b""
        self._idle: asyncio.Future[None] | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._killed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if self._answer or len(data) != ANSWER.size:  # an answer split across reads (or a stray byte)
            data = self._answer + data
            self._answer, data = data[ANSWER.size :], data[: ANSWER.size]
            if len(data) < ANSWER.size:
                self._answer = data
                return
        (failure,) = ANSWER.unpack(data)
        batch, self.in_flight = self.in_flight, None
        if batch is None:
            # An answer read after its batch's deadline rang (the loop ran the timer first): the
            # batch is on disk, and its copy shipped, all the same; its refusal is undone once the
            # appender's end is read (AuditLog._append_batch), so it is not cut from the file.
            late, self.late = self.late, None
            if late is not None and not failure:
                self.size = late.end
            return
        if not failure:
            self.size = batch.end  # whether or not anyone still waits: the next batch goes after it
        if not batch.answer.done():  # done: its waiter was cancelled, or timed out
            batch.answer.set_result(failure)
        self._settle()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        # The end of its stdout, not the process's exit, which the loop may see before the last
        # answer is read: after this, nothing more can be answered.
        if fd == 1:
            self.stdout_closed = True
            if not self.stdout_eof.done():
                self.stdout_eof.set_result(None)
            batch, self.in_flight = self.in_flight, None
            if batch is not None and not batch.answer.done():
                batch.answer.set_exception(AppenderGoneError(errno.EIO, "the audit appender process exited"))
            self._settle()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    async def idle(self) -> None:
        """Once no batch is in flight (only after a waiter was cancelled does one linger)."""
        while self.in_flight is not None:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    def time_out(self, batch: _Batch) -> None:
        """The deadline of ``batch``, left armed when its waiter is cancelled so that a stalled
        appender is still found out. An answer that comes later must not count the batch as
        written (it is refused, and rolled back in the chain), and nothing more goes to this
        appender, whose answers are out of step: it is killed here, at once, so that it cannot
        write (or ship a copy of) a batch after its deadline, and the trail is to be cut back."""
        if self.in_flight is batch:
            self.in_flight = None
            self.overdue = True
            self.late = batch
            self._settle()
            if not batch.answer.done():
                batch.answer.set_exception(_overdue_error(batch.end))
            try:
                self.kill()
            except Exception as error:  # a timer's callback: the waiter's kill() tries again
                print(f"audit: could not kill the overdue appender: {error}", file=sys.stderr)
        elif not batch.answer.done():
            batch.answer.set_exception(_overdue_error())

    def kill(self) -> None:
        """SIGKILL, once. A second signal would find a zombie, which Popen.send_signal's poll
        reaps before asyncio's child watcher can: the watcher then reports 255, not -SIGKILL."""
        if self._killed or self._transport is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it has ended meanwhile
            self._transport.kill()
        self._killed = True

    def _settle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)


@dataclass(slots=True)
class _Unsettled:
    """A batch whose writer was cancelled before its answer (see AuditLog._settle_unsettled)."""

    saved: tuple[int, str, int, float]  # the chain's state before it: seq, head, unsigned, first unsigned
    count: int  # its lines
    batch: list[_Pending]
    size: int  # the trail's length before it
    copy: bytes  # the log collector's copy, when it is written here rather than by the appender


@dataclass(slots=True)
class _Batch:
    end: int  # the trail's length once this batch is on disk
    answer: asyncio.Future[int]  # the appender's: 0, or the errno it failed with


def _overdue_error(batch_end: int | None = None) -> AppenderGoneError:
    error = AppenderGoneError(errno.ETIMEDOUT, f"the audit appender did not answer in {ANSWER_SECONDS:g}s")
    error.batch_end = batch_end
    return error


class _AppendProcess:
    """The one process that appends and fsyncs batches (``audit_appender.py`` says why a process):
    batches go one at a time down its stdin, and each is answered on its stdout once on disk."""

    def __init__(self, transport: asyncio.SubprocessTransport, pipes: _AppenderPipes) -> None:
        self._transport = transport
        self._pipes = pipes
        self._loop = pipes.exited.get_loop()
        # A pipe (start); uvloop's pipe transports are not asyncio.WriteTransport's subclasses.
        self._stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))

    @classmethod
    async def start(cls, trail_fd: int, copy_fd: int, size: int) -> _AppendProcess:
        """``size``: the trail's length now, after which its first batch goes."""
        if not sys.executable:
            raise OSError(errno.ENOENT, "no Python interpreter to start the audit appender with")
        transport, pipes = await asyncio.get_running_loop().subprocess_exec(
            lambda: _AppenderPipes(size),
            # -I -S: no environment, no site-packages; the appender needs the standard library only.
            sys.executable, "-I", "-S", str(APPENDER), str(trail_fd), str(copy_fd),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, pass_fds=(trail_fd, copy_fd),
            start_new_session=True,  # a terminal's Ctrl-C is the runtime's to act on: it ends at its stdin's end
        )  # fmt: skip
        return cls(transport, pipes)

    @property
    def size(self) -> int:
        """The trail's length after the last batch this appender answered as on disk."""
        return self._pipes.size

    @property
    def pid(self) -> int:
        return self._transport.get_pid()

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    async def append(self, data: bytes, copy: bytes) -> None:
        """Returns once ``data`` is on disk after the trail's ``size`` bytes; OSError (the
        appender's errno) when it could not be; AppenderGoneError when the appender died or did
        not answer within ANSWER_SECONDS (then it is to be killed). A waiter cancelled meanwhile
        leaves its batch to be answered, and counted in ``size``, all the same."""
        pipes = self._pipes
        if pipes.in_flight is not None:
            await pipes.idle()
        if pipes.overdue:
            raise _overdue_error()
        if pipes.stdout_closed or self._transport.get_returncode() is not None or self._stdin.is_closing():
            raise AppenderGoneError(errno.EIO, "the audit appender process exited")
        try:
            self._stdin.writelines((HEADER.pack(pipes.size, len(data), len(copy)), data, copy))
        except (ConnectionError, RuntimeError):  # RuntimeError: uvloop's, on a pipe it closed meanwhile
            raise AppenderGoneError(errno.EIO, "the audit appender process exited") from None
        loop = self._loop
        batch = pipes.in_flight = _Batch(pipes.size + len(data), loop.create_future())
        deadline = loop.call_later(ANSWER_SECONDS, pipes.time_out, batch)
        try:
            failure = await batch.answer
        finally:
            if not batch.answer.cancelled():  # a cancelled waiter leaves the deadline to the batch
                deadline.cancel()
        if failure:
            raise OSError(failure, os.strerror(failure))

    async def wait(self) -> int:
        """Its exit status, once it has ended and every answer it wrote has been read (closing
        the pipes before would drop an answer the loop had not read yet)."""
        await asyncio.shield(self._pipes.exited)
        await asyncio.shield(self._pipes.stdout_eof)
        returncode = self._transport.get_returncode()
        assert returncode is not None  # it has exited
        self._transport.close()
        return returncode

    async def stop(self) -> None:
        """After the batches sent: the batch in flight is answered (or its deadline, which is
        not restarted here, kills the appender), then the appender ends at its stdin's end (killed
        if it has not within ANSWER_SECONDS), and nothing more of it reaches the file once this
        returns. The answer is read first: the loop may see the exit before the last answer."""
        await self._pipes.idle()
        self._stdin.close()
        try:
            async with asyncio.timeout(ANSWER_SECONDS):
                await self.wait()
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        self._pipes.kill()
        await self.wait()


class AuditLog:
    def __init__(
        self,
        path: str | Path,
        keys: KeyRing | None,
        to_stdout: bool = True,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        on_write: Callable[[float, int], None] | None = None,
        stream: TextIO | None = None,
        checkpoints_to_stdout: bool = True,
    ) -> None:
        """``to_stdout``: every record also goes to ``stream`` (default: stdout);
        ``checkpoints_to_stdout``: every checkpoint goes there as an ``audit_checkpoint`` line."""
        self.path = Path(path)
        self.to_stdout = to_stdout
        self.checkpoints_to_stdout = checkpoints_to_stdout
        self.stream = stream
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.on_write = on_write  # (seconds a batch took, records in it), for metrics
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        signer = keys.audit_signer if keys is not None else None
        # No audit key (a key directory from an older operator): keep serving, sign with a key of
        # this process's own and say so in every checkpoint; verify does not trust it by itself.
        self.ephemeral_key = signer is None
        self._kid, self._key = signer or (f"ephemeral-{secrets.token_hex(8)}", ed25519.Ed25519PrivateKey.generate())
        # What the writer is to write, in order (None: close() asks it to stop). A deque and one
        # future the writer waits on when it is empty, not an asyncio.Queue: a third of the cost.
        self._queue: collections.deque[_Pending | _Wake | None] = collections.deque()
        self._queue_filled: asyncio.Future[None] | None = None
        self._alarm: asyncio.TimerHandle | None = None  # puts _WAKE in the queue at _alarm_due
        self._alarm_due: float | None = None
        self._fd = -1
        self._copy_fd = -1  # a copy of stdout's descriptor, for the appender
        self._size = 0  # the file's length after the last good append, to undo a failed one
        self._seq = 0
        self._head = GENESIS
        self._trail = ""
        self._since_checkpoint = 0
        self._first_unsigned = 0.0  # monotonic time the oldest unsigned record was chained
        self._writer: asyncio.Task[None] | None = None
        self._appender: _AppendProcess | None = None
        self._started_appender = -RETRY_SECONDS  # monotonic time the last appender was started
        self._retry_at = 0.0  # after a failed write: monotonic time the next try is due
        self._outage: dict[str, Any] | None = None  # since when writes fail, how many records were refused
        self._closing = False
        self._unsettled: _Unsettled | None = None
        self._unwritten_copy = b""  # a cancelled batch's copy, until it is _Unsettled's
        self.healthy = True
        self.recovered: dict[str, Any] | None = None  # the details of the recover record, if one was written

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover = await asyncio.to_thread(self._recover)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        shipped: list[str] = []
        lines = [self._checkpoint(Reason.START, shipped)]
        if recover is not None:
            self.recovered = recover["details"]
            lines.append(self._chain(recover))
            lines.append(self._checkpoint(Reason.RECOVERY, shipped))
        try:
            await self._append_durably(lines, shipped)
        except BaseException:
            await self._stop_appending()
            raise
        if self.ephemeral_key:
            print(
                f"warning: {self.path}: the key directory has no audit key (audit-<kid>), so audit checkpoints are "
                f"signed with the ephemeral key {self._kid}; they verify only against the checkpoint lines on "
                "stdout. Add an audit key to the key Secret and restart.",
                file=sys.stderr,
            )
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    def _recover(self) -> dict[str, Any] | None:
        """Continues the chain of an existing file from its last good record. Returns the record
        to write about what was found (an unclean shutdown, damage, a torn last line), or None."""
        data = self.path.read_bytes() if self.path.exists() else b""
        declared: list[_Span] = []
        damaged: list[dict[str, Any]] = []  # runs of unreadable lines, each {offset, length, line}
        torn: tuple[int, bytes, int] | None = None
        last_checkpoint: dict[str, Any] | None = None
        last_checkpoint_seq: int | None = None
        first_unsigned = 0
        for number, (offset, raw) in enumerate(_lines(data), start=1):
            if not raw.endswith(b"\n"):
                torn = (offset, raw, number)
                break
            record, _ = _parse(raw)
            if record is None or not _self_consistent(record, raw):
                previous = damaged[-1] if damaged else None
                if previous is not None and previous["offset"] + previous["length"] == offset:
                    previous["length"] += len(raw)
                else:
                    damaged.append({"offset": offset, "length": len(raw), "line": number})
                continue
            self._seq, self._head = record["seq"], str(record["hash"])
            self.recent.append(record)
            found = record.get("details")
            if record.get("type") == "checkpoint" and isinstance(found, dict):
                last_checkpoint, last_checkpoint_seq = found, record["seq"]
                self._trail = str(found.get("trail") or self._trail)
                self._since_checkpoint = 0
            else:
                first_unsigned = first_unsigned if self._since_checkpoint else record["seq"]
                self._since_checkpoint += 1
                declared.extend(_declared_damage(record))
        if not self._trail:
            self._trail = secrets.token_hex(8)  # a new file: the id ties the stdout copy to it
        new_damage = [run for run in damaged if not any(span.covers(run["offset"]) for span in declared)]
        ended_cleanly = last_checkpoint is not None and last_checkpoint.get("reason") == Reason.FINAL
        clean = self._seq == 0 or (ended_cleanly and not self._since_checkpoint)
        unsigned = self._since_checkpoint
        self._since_checkpoint = 0  # the start checkpoint follows at once
        if clean and not new_damage and torn is None:
            return None
        details: dict[str, Any] = {"clean": clean, "last_checkpoint": last_checkpoint_seq}
        if unsigned:
            details["unsigned"] = {"from": first_unsigned, "to": self._seq}
        if new_damage or torn is not None:
            spans = [
                (run["offset"], data[run["offset"] : run["offset"] + run["length"]], run["line"]) for run in new_damage
            ]
            details["damaged"] = [_describe_bytes(offset, chunk, line) for offset, chunk, line in spans]
            if torn is not None:
                details["torn_tail"] = _describe_bytes(*torn)
                spans.append(torn)
            details["set_aside"] = self._set_aside(spans)
            if torn is not None:
                # Never acknowledged (its fsync did not return), and the next append must start a line.
                with self.path.open("r+b") as handle:
                    handle.truncate(torn[0])
                    os.fsync(handle.fileno())
        return self._new_record(type="audit", action="recover", result="recovered", details=details)

    def _set_aside(self, spans: list[tuple[int, bytes, int]]) -> str:
        """Copies damaged bytes to ``<file>.damaged-<time>`` (JSON lines: offset, line, bytes in
        base64), durably, before anything is cut. Returns the file's name."""
        content = b"".join(
            canonical({**_describe_bytes(offset, chunk, line), "base64": base64.b64encode(chunk).decode()}) + b"\n"
            for offset, chunk, line in spans
        )
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        for attempt in range(100):
            target = self.path.with_name(f"{self.path.name}.damaged-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            return target.name
        raise FileExistsError(f"{self.path}: cannot name a file for the damaged bytes")

    async def close(self) -> None:
        """Writes what is queued, then a final checkpoint, and closes the file."""
        if self._writer is None:
            return
        self._closing = True
        self._put(None)  # after everything queued before it
        try:
            try:
                await self._writer
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # close() itself is cancelled (and the writer with it)
                # Only the writer was (a shutdown cancels every task): its batch is settled below.
            self._writer = None
            await self._settle_unsettled()
            # Records queued behind a cancelled writer's batch are written too, not left waiting.
            queued = [item for item in self._queue if isinstance(item, _Pending)]
            self._queue.clear()
            if queued:
                await self._write(queued, at_once=True)
            shipped: list[str] = []
            lines = [*self._outage_lines(), self._checkpoint(Reason.FINAL, shipped)]
            try:
                await self._append_durably(lines, shipped, at_once=True)
            except AppenderGoneError:  # it died since the last batch: the final checkpoint goes to a new one
                await self._append_durably(lines, shipped, at_once=True)
            await self._stop_appending()
        except BaseException:  # cancelled (a shutdown's deadline), failed, or the writer died of a bug
            self._writer = None
            await self._abandon()
            raise

    async def _stop_appending(self) -> None:
        try:
            if self._appender is not None:  # cleared once stopped: cancelled meanwhile, _abandon kills it
                await self._appender.stop()
                self._appender = None
        finally:
            self._close_descriptors()

    def _close_descriptors(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._copy_fd >= 0:
            os.close(self._copy_fd)
            self._copy_fd = -1

    async def _abandon(self) -> None:
        """close() was cancelled or failed: nothing more is written. The appender is killed (its
        end waited for at most ANSWER_SECONDS: SIGKILL waits on a disk that does not answer), the
        trail is cut to what it answered, and every caller still waiting gets its answer: an
        unsettled batch's callers by what the trail holds, the queued ones refused. The trail is
        left as after a crash, without its final checkpoint; the next start continues it."""
        try:
            known = self._appender is None  # the trail's length is known: nothing unanswered in flight
            if self._appender is not None:
                appender, self._appender = self._appender, None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ANSWER_SECONDS):
                        await appender.kill()
                        known = True
                if known:
                    self._size = appender.size
                    await self._cut_back_off_the_loop()
            error = OSError(errno.EIO, "the audit log was closed before the record was written")
            unsettled, self._unsettled = self._unsettled, None
            if unsettled is not None:
                if known and self._size > unsettled.size:  # answered: on disk
                    self._acknowledge(unsettled.batch)
                else:  # not answered, or not known: possibly on disk (the next start keeps what is whole)
                    self._refuse_callers(unsettled.batch, error)
            self._refuse_callers([item for item in self._queue if isinstance(item, _Pending)], error)
            self._queue.clear()
        finally:
            self._close_descriptors()

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
        if self._writer is None or self._writer.done() or self._closing:
            raise RuntimeError("the audit log is not running")
        record = self._new_record(
            type=type,
            action=action,
            result=result,
            actor=actor,
            resource=resource,
            client_ip=client_ip,
            request_id=request_id,
            trace_id=trace_id,
            details=details,
        )
        # The writer's loop, not get_running_loop(): that is a getpid() (see Deadlines.run).
        done: asyncio.Future[dict[str, Any]] = self._writer.get_loop().create_future()
        self._put(_Pending(record, done))
        return await done

    @staticmethod
    def _new_record(
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
        return {
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

    def _chain(self, record: dict[str, Any], signed: bool = False) -> str:
        """``signed``: a checkpoint, whose signature covers canonical()'s bytes and whose stdout
        copy verify re-serialises: written by canonical() itself, so no float can read otherwise."""
        record["seq"] = self._seq + 1
        record["prev"] = self._head
        body = canonical(record) if signed else _written(record)  # once: hashed, then written with the hash
        self._seq += 1  # only now: a value JSON cannot hold has raised above and changed nothing
        record["hash"] = self._head = hashlib.sha256(body).hexdigest()
        self.recent.append(record)
        return f'{body[:-1].decode()},"hash":"{record["hash"]}"}}\n'

    def _checkpoint(self, reason: Reason, shipped: list[str]) -> str:
        """A signed checkpoint over the chain so far; its stdout copy is added to ``shipped``."""
        details: dict[str, Any] = {
            "format": FORMAT,
            "trail": self._trail,
            "reason": reason.value,
            "upto": self._seq,
            "head": self._head,
            "every": self.checkpoint_every,
            "seconds": self.checkpoint_seconds,
            "kid": self._kid,
            "alg": "EdDSA",
        }
        if self.ephemeral_key:
            details.update(ephemeral=True, public_key=public_jwk(self._kid, self._key.public_key()))
        record = {
            "time": utc_now(),
            "type": "checkpoint",
            "action": "checkpoint",
            "result": "success",
            "details": details,
            "seq": self._seq + 1,
            "prev": self._head,
        }
        details["signature"] = base64.b64encode(self._key.sign(checkpoint_message(record))).decode()
        self._since_checkpoint = 0
        line = self._chain(record, signed=True)
        shipped.append(f'{{"{CHECKPOINT_LINE}":{line[:-1]}}}\n')
        return line

    async def _append_durably(self, lines: list[str], shipped: list[str], at_once: bool = False) -> None:
        """Appends ``lines`` and returns once they are on disk; on OSError none of them is in the
        file. The copy for the log collector is written by the appender, once it has answered.
        ``at_once``: a new appender, if one is needed, is started even within RETRY_SECONDS of the
        last (the final checkpoint: there is no later batch to wait for)."""
        if self._fd < 0:
            raise RuntimeError("the audit log is not running")
        data = "".join(lines).encode()
        copy = (data if self.to_stdout else b"") + ("".join(shipped).encode() if self.checkpoints_to_stdout else b"")
        by_appender = bool(copy) and self._copies_through()
        try:
            await self._append_batch(data, copy if by_appender else b"", at_once)
        except asyncio.CancelledError:
            if not by_appender:  # for close() to write once it knows the batch is on disk
                self._unwritten_copy = copy
            raise
        if copy and not by_appender:
            self._write_copy(copy)

    def _write_copy(self, copy: bytes) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # best effort, as the appender's
            stream = self.stream or sys.stdout
            stream.write(copy.decode())
            stream.flush()

    async def _append_batch(self, data: bytes, copy: bytes, at_once: bool) -> None:
        appender = self._appender
        if appender is None:  # at start, and after an appender died: at most one a RETRY_SECONDS
            if not at_once and time.monotonic() < self._started_appender + RETRY_SECONDS:
                raise OSError(errno.EAGAIN, "the audit appender is being restarted")
            self._started_appender = time.monotonic()
            appender = self._appender = await _AppendProcess.start(self._fd, self._stdout_copy_fd(), self._size)
        try:
            await appender.append(data, copy)
        except AppenderGoneError as error:
            # It may have written part of the batch, or all of it unanswered: once it is gone for
            # certain, the file is cut back, so the chain goes on from the last answered batch
            # (and the next appender cuts it back itself before it writes, should this fail).
            self.healthy = False  # while a stuck one is killed, which waits for its disk
            await appender.kill()
            self._size = appender.size  # what it answered as on disk, its last answer read
            self._appender = None
            if error.batch_end is not None and self._size >= error.batch_end:
                return  # answered after its deadline rang, before the appender's end: on disk, kept
            await self._cut_back_off_the_loop()
            raise
        # (Cancelled meanwhile, this is not reached: the appender still counts the batch in its
        # size when it answers, and this copy is only read once it is gone.)
        self._size = appender.size

    def _stdout_copy_fd(self) -> int:
        """A descriptor for the appender's copies: stdout's, as stdout is now (or /dev/null)."""
        if self._copy_fd < 0:
            try:
                self._copy_fd = os.dup(sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):  # no stdout, or one without a descriptor
                self._copy_fd = os.open(os.devnull, os.O_WRONLY)
        return self._copy_fd

    def _copies_through(self) -> bool:
        """Whether the appender writes this batch's copy: yes unless the copy goes to a stream
        given (tests), or stdout has been replaced since the appender started (then the copy is
        written here, to whatever it is now). Whatever was printed before goes first."""
        if self.stream is not None:
            return False
        try:
            sys.stdout.flush()
            return os.path.sameopenfile(sys.stdout.fileno(), self._stdout_copy_fd())
        except (OSError, ValueError, AttributeError):
            return False

    async def _cut_back_off_the_loop(self) -> None:
        """_cut_back in a thread, finished even if the caller is cancelled meanwhile: a thread
        cannot be stopped, and one still cutting would race what comes next on the descriptor
        (the next appender's batch, or its closing, after which the number may name another file)."""
        cut = asyncio.ensure_future(asyncio.to_thread(self._cut_back))
        cancelled = False
        while not cut.done():
            try:
                await asyncio.shield(cut)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _cut_back(self) -> None:
        with contextlib.suppress(OSError):  # if this fails too, the next appender cuts it before it writes
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)

    def _due(self) -> float | None:
        """When the writer must write with no record waiting (monotonic time), if ever: a
        checkpoint_seconds after the oldest unsigned record; after a failed write, a retry."""
        if self._outage is not None:
            # The last write failed, and /readyz says so, which keeps requests (the batches that
            # would show the trail writable again) away: try on our own every RETRY_SECONDS (not
            # sooner, even if a checkpoint is overdue), with the outage's record (real bytes).
            return self._retry_at
        if self._since_checkpoint:
            return self._first_unsigned + self.checkpoint_seconds
        return None

    def _set_alarm(self, due: float | None) -> None:
        """A wake-up in the queue at ``due``. One timer kept while the time it is for stands,
        not a timeout around every batch's wait: some record nearly always waits for its
        checkpoint, and arming and cancelling a timeout per batch cost the loop 6 µs each."""
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._alarm_due = due
        if due is not None:
            self._alarm = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._ring)

    def _put(self, item: _Pending | _Wake | None) -> None:
        self._queue.append(item)
        filled, self._queue_filled = self._queue_filled, None
        if filled is not None and not filled.done():  # done: the writer was cancelled meanwhile
            filled.set_result(None)

    def _ring(self) -> None:
        self._alarm = self._alarm_due = None  # spent: the writer sets the next one
        self._put(_WAKE)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = self._due()
                if due != self._alarm_due:
                    self._set_alarm(due)
                while not self._queue:
                    self._queue_filled = loop.create_future()
                    await self._queue_filled
                item = self._queue.popleft()
                if item is _WAKE:
                    # The loop's timers may ring a little early (uvloop counts whole milliseconds);
                    # then the alarm is set again for what is left.
                    if due is not None and time.monotonic() >= due:
                        await self._write([])  # records have waited checkpoint_seconds (or a retry)
                    continue
                batch: list[_Pending] = []
                while item is not None:
                    if not isinstance(item, _Wake):  # due or not, the batch's write checks the clock
                        batch.append(item)
                    if len(batch) >= MAX_BATCH or not self._queue:
                        break
                    item = self._queue.popleft()
                if batch:
                    await self._write(batch)
                if item is None:
                    return  # close() asked for it, after everything queued before
        finally:
            self._set_alarm(None)

    def _outage_lines(self) -> list[str]:
        """First in the batch that ends an outage: its record (when writes failed, and what was lost)."""
        if self._outage is None:
            return []
        details = {**self._outage, "until": utc_now()}
        line = self._chain(self._new_record(type="audit", action="unavailable", result="recovered", details=details))
        self._since_checkpoint += 1
        if self._since_checkpoint == 1:
            self._first_unsigned = time.monotonic()
        return [line]

    def _refuse(self, saved: tuple[int, str, int, float], count: int, batch: list[_Pending], error: OSError) -> None:
        """None of a batch's ``count`` lines is in the file: the chain goes on from where the file
        ends (``saved``: its state before the batch), and the batch's callers are refused."""
        self._seq, self._head, self._since_checkpoint, self._first_unsigned = saved
        for _ in range(min(count, len(self.recent))):
            self.recent.pop()
        self.healthy = False
        # Every record chained and lost, its caller waiting or not (one cancelled by a shutdown
        # still lost its record); not one its own details failed to chain (already answered).
        lost = sum(not item.done.done() or item.done.cancelled() for item in batch)
        if self._outage is None:
            # Since the first lost record was made (a batch may wait up to ANSWER_SECONDS).
            self._outage = {"since": batch[0].record["time"] if batch else utc_now(), "refused_records": 0}
        self._outage["refused_records"] += lost
        self._outage["last_error"] = str(error)
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._refuse_callers(batch, error)

    @staticmethod
    def _refuse_callers(batch: list[_Pending], error: OSError) -> None:
        for item in batch:
            if not item.done.done():
                item.done.set_exception(AuditUnavailableError(error))

    def _acknowledge(self, batch: list[_Pending]) -> None:
        self.healthy = True
        self._outage = None
        for item in batch:
            if not item.done.done():
                item.done.set_result(item.record)

    async def _settle_unsettled(self) -> None:
        """After the writer was cancelled mid-batch: the appender answers what it was sent (or is
        killed at that batch's deadline), what it did not answer is cut from the file, and the chain
        is rolled back to match when the batch is not on disk, before anything is chained after it."""
        unsettled = self._unsettled
        if unsettled is None:
            return
        if self._appender is not None:  # cleared only once stopped: close() kills it if cancelled here
            await self._appender.stop()
            self._size = self._appender.size
            self._appender = None
        await self._cut_back_off_the_loop()
        self._unsettled = None
        if self._size > unsettled.size:  # it answered the batch: on disk
            self._acknowledge(unsettled.batch)
            if unsettled.copy:
                self._write_copy(unsettled.copy)
        else:
            error = OSError(errno.EIO, "the audit writer was cancelled before its batch was written")
            self._refuse(unsettled.saved, unsettled.count, unsettled.batch, error)

    async def _write(self, batch: list[_Pending], at_once: bool = False) -> None:
        """``at_once``: as for _append_durably."""
        started = time.perf_counter()
        saved = (self._seq, self._head, self._since_checkpoint, self._first_unsigned)
        shipped: list[str] = []
        lines: list[str] = self._outage_lines()
        for item in batch:
            try:
                line = self._chain(item.record)
            except (TypeError, ValueError) as error:  # details JSON cannot hold: that caller's error only
                item.done.set_exception(error)
                continue
            if not self._since_checkpoint:
                self._first_unsigned = time.monotonic()
            lines.append(line)
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                lines.append(self._checkpoint(Reason.INTERVAL, shipped))
        if self._since_checkpoint and time.monotonic() - self._first_unsigned >= self.checkpoint_seconds:
            lines.append(self._checkpoint(Reason.INTERVAL, shipped))
        size = self._size
        try:
            await self._append_durably(lines, shipped, at_once)
        except OSError as error:
            self._refuse(saved, len(lines), batch, error)
        except asyncio.CancelledError:
            # The writer is cancelled with the batch's fate unknown: the appender may still write
            # it, or not. close() learns which before it chains its final checkpoint.
            self._unsettled = _Unsettled(saved, len(lines), batch, size, self._unwritten_copy)
            self._unwritten_copy = b""
            raise
        else:
            self._acknowledge(batch)
        if self.on_write is not None and batch:
            self.on_write(time.perf_counter() - started, len(batch))


# --- verification -----------------------------------------------------------------------------------


class AuditKeyError(ValueError):
    """Public keys that cannot be used."""


def load_public_keys(data: bytes) -> dict[str, ed25519.Ed25519PublicKey]:
    """The Ed25519 keys of a JWK set (what ``agent-runtime audit export-key`` prints), by kid."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise AuditKeyError('not a JSON document (expected a JWK set: {"keys": [...]})') from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise AuditKeyError('not a JWK set (expected {"keys": [...]})')
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue  # another kind of key (a token JWKS may hold RSA keys too): not an audit key
        kid, x = entry.get("kid"), entry.get("x")
        if not isinstance(kid, str) or not kid or not isinstance(x, str):
            raise AuditKeyError(f"key {index}: an Ed25519 key needs a kid and x")
        try:
            keys[kid] = ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(x))
        except (ValueError, binascii.Error):
            raise AuditKeyError(f"key {kid!r}: x is not a 32-byte Ed25519 public key in base64url") from None
    if not keys:
        raise AuditKeyError("the JWK set holds no Ed25519 key")
    return keys


def _verify_checkpoint_signature(record: dict[str, Any], key: ed25519.Ed25519PublicKey, details: dict[str, Any]) -> str:
    """'' when the signature is good, else why not."""
    try:
        signature = base64.b64decode(str(details.get("signature", "")), validate=True)
    except (ValueError, binascii.Error):
        return "checkpoint signature is not base64"
    try:
        key.verify(signature, checkpoint_message(record))
    except InvalidSignature:
        return "checkpoint signature does not verify"
    except (ValueError, TypeError, RecursionError):
        return "checkpoint cannot be checked"
    return ""


def _announced_key(details: dict[str, Any]) -> ed25519.Ed25519PublicKey | None:
    """The public key an ephemeral checkpoint carries, if well-formed and named by its kid."""
    jwk = details.get("public_key")
    if not details.get("ephemeral") or not isinstance(jwk, dict) or jwk.get("kid") != details.get("kid"):
        return None
    try:
        return load_public_keys(json.dumps({"keys": [jwk]}).encode()).get(str(details.get("kid")))
    except AuditKeyError:
        return None


@dataclass(frozen=True)
class _Shipped:
    seq: int
    hash: str
    trail: str
    line: int


def _shipped_record(raw: bytes) -> dict[str, Any] | None:
    """The checkpoint on a line of the log collector's copy: an ``audit_checkpoint`` line or a
    checkpoint record, maybe behind a timestamp prefix or inside a JSON log wrapper."""
    start = raw.find(b"{")
    if start < 0:
        return None
    document, _ = _parse(raw[start:])
    if document is not None and isinstance(document.get("log"), str):  # a container runtime's JSON log
        document, _ = _parse(document["log"].encode())
    if document is None:
        return None
    if CHECKPOINT_LINE in document:
        inner = document[CHECKPOINT_LINE]
        return inner if isinstance(inner, dict) else {}
    return document if document.get("type") == "checkpoint" else None


def _read_shipped(
    data: bytes, keys: Mapping[str, ed25519.Ed25519PublicKey]
) -> tuple[list[_Shipped], dict[str, tuple[str, ed25519.Ed25519PublicKey]], list[str]]:
    """The signed checkpoints of the log collector's copy, the ephemeral keys it announces (by kid:
    trail, key) and what in it is not a valid signed checkpoint."""
    shipped: list[_Shipped] = []
    announced: dict[str, tuple[str, ed25519.Ed25519PublicKey]] = {}
    problems: list[str] = []
    for number, (_, raw) in enumerate(_lines(data), start=1):
        record = _shipped_record(raw)
        if record is None:
            continue  # another line of the pod's output
        details = record.get("details")
        where = f"line {number} of the checkpoint copy"
        if not _self_consistent(record) or not isinstance(details, dict) or details.get("format") != FORMAT:
            problems.append(f"{where}: not a checkpoint record of this format (edited?)")
            continue
        kid = str(details.get("kid"))
        key = keys.get(kid) or _announced_key(details)
        if key is None:
            problems.append(f"{where}: checkpoint seq {record['seq']} signed by unknown key {kid!r}")
            continue
        why = _verify_checkpoint_signature(record, key, details)
        if why:
            problems.append(f"{where}: {why} (seq {record['seq']})")
            continue
        trail = str(details.get("trail"))
        if kid not in keys:
            announced[kid] = (trail, key)
        shipped.append(_Shipped(record["seq"], str(record["hash"]), trail, number))
    return shipped, announced, problems


@dataclass(frozen=True)
class Verification:
    status: Status
    records: int
    checkpoints: int
    problems: tuple[str, ...] = ()  # why it failed, each naming a line and record
    unsigned: tuple[str, ...] = ()  # records no signature covered in time (unclean shutdowns)
    notes: tuple[str, ...] = ()  # what an auditor should know that is no failure
    first_bad_line: int | None = None
    first_bad_seq: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.VERIFIED

    def describe(self) -> str:
        counts = f"{self.records} records, {self.checkpoints} checkpoints"
        if self.status is Status.VERIFIED:
            lines = [f"ok: {counts}, chain intact, every record signed by an audit key, ends with a final checkpoint"]
        elif self.status is Status.UNSIGNED:
            lines = [f"INCOMPLETE: {counts}, chain intact and signatures verified, but:", *self.unsigned]
        else:
            lines = [f"FAILED: {problem}" for problem in self.problems]
            lines += [f"also: {span}" for span in self.unsigned]
        return "\n".join([*lines, *(f"note: {note}" for note in self.notes)])


@dataclass
class _Walk:
    """The state of one pass over a trail, first line to last."""

    keys: Mapping[str, ed25519.Ed25519PublicKey]
    announced: Mapping[str, tuple[str, ed25519.Ed25519PublicKey]]
    declared: list[_Span]
    data: bytes
    expected_seq: int = 1
    head: str = GENESIS
    last_seq: int = 0
    records: int = 0
    checkpoints: int = 0
    trail: str | None = None
    last_checkpoint: dict[str, Any] | None = None
    last_checkpoint_seq: int = 0
    last_was_final: bool = False
    span: list[dict[str, Any]] = field(default_factory=list)  # records since the last checkpoint
    span_damaged: bool = False
    resync: bool = False
    stopped: bool = False
    hashes: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unsigned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_bad: tuple[int, int | None, str] | None = None

    def where(self, line: int, seq: Any) -> str:
        if _is_int(seq):
            return f"line {line} (record seq {seq})"
        return f"line {line} (after record seq {self.last_seq})"

    def fail(self, line: int, seq: Any, reason: str, stop: bool = True) -> None:
        self.problems.append(f"{self.where(line, seq)}: {reason}")
        if self.first_bad is None:
            self.first_bad = (line, seq if _is_int(seq) else None, reason)
        self.stopped = self.stopped or stop

    def line(self, number: int, offset: int, raw: bytes) -> None:
        if not raw.endswith(b"\n"):
            self.notes.append(
                f"line {number}: an incomplete last line ({len(raw)} bytes), a write cut short and never "
                "acknowledged; not part of the trail"
            )
            return
        span = next((s for s in self.declared if s.covers(offset)), None)
        if span is not None and hashlib.sha256(self.data[span.offset : span.offset + span.length]).hexdigest() == (
            span.sha256
        ):
            if span.offset == offset:
                self.fail(
                    number,
                    None,
                    f"damaged ({span.length} bytes at offset {span.offset}); set aside by the runtime's recovery "
                    f"(record seq {span.recorded_at}) in {span.set_aside}: the records in it are lost from the chain",
                    stop=False,
                )
            self.resync = self.span_damaged = True
            return
        record, why = _parse(raw)
        if record is None:
            self.fail(number, None, why)
            return
        seq = record.get("seq")
        if self.resync:
            # After declared damage the next record is taken as is: what it follows is lost.
            if not _is_int(seq) or not _self_consistent(record, raw) or seq <= self.last_seq:
                self.fail(number, seq, "does not continue the chain after the damaged lines")
                return
            self.expected_seq, self.head = seq, str(record.get("prev"))
            self.resync = False
        if not _is_int(seq) or seq != self.expected_seq:
            self.fail(
                number,
                seq,
                f"sequence {seq} where {self.expected_seq} was expected (a record was removed, inserted or moved)",
            )
            return
        if record.get("prev") != self.head:
            self.fail(number, seq, "does not follow the previous record (prev hash differs)")
            return
        if not _self_consistent(record, raw):
            self.fail(number, seq, "content does not match its hash (the record was edited)")
            return
        is_checkpoint = record.get("type") == "checkpoint"
        details = record.get("details")
        if self.last_was_final and not (
            is_checkpoint and isinstance(details, dict) and details.get("reason") == "start"
        ):
            self.fail(
                number,
                seq,
                f"follows the final checkpoint (seq {self.last_checkpoint_seq}) without a signed restart: "
                "records were appended after a clean shutdown",
            )
            return
        if is_checkpoint:
            self.checkpoint(number, record)
            if self.stopped:
                return
        else:
            if self.last_checkpoint is None and not self.span_damaged:
                self.fail(
                    number,
                    seq,
                    "comes before any checkpoint: a trail begins with a signed start checkpoint "
                    "(written by an older runtime, or rewritten from scratch)",
                )
                return
            self.records += 1
            self.span.append(record)
            self.recovery_note(record)
        self.hashes[seq] = str(record["hash"])
        self.head, self.expected_seq, self.last_seq = str(record["hash"]), seq + 1, seq

    def recovery_note(self, record: dict[str, Any]) -> None:
        details = record.get("details")
        if record.get("type") != "audit" or record.get("action") != "recover" or not isinstance(details, dict):
            return
        torn = details.get("torn_tail")
        if isinstance(torn, dict):
            self.notes.append(
                f"record seq {record['seq']}: at start-up the runtime cut off an incomplete last line (a write "
                f"never acknowledged, {torn.get('length')} bytes at offset {torn.get('offset')}) and kept it in "
                f"{details.get('set_aside')}"
            )
        damaged = details.get("damaged")
        if isinstance(damaged, list) and damaged:
            self.notes.append(
                f"record seq {record['seq']}: at start-up the runtime found {len(damaged)} damaged span(s) and "
                f"copied them to {details.get('set_aside')}"
            )

    def checkpoint(self, number: int, record: dict[str, Any]) -> None:
        seq: int = record["seq"]
        details = record.get("details")
        if not isinstance(details, dict):
            self.fail(number, seq, "checkpoint without details")
            return
        if details.get("format") != FORMAT:
            self.fail(number, seq, "checkpoint in an older format (signed with the token key, not an audit key)")
            return
        if details.get("upto") != seq - 1 or details.get("head") != self.head:
            self.fail(number, seq, "checkpoint does not describe the chain before it")
            return
        reason, every, seconds = details.get("reason"), details.get("every"), details.get("seconds")
        if reason not in set(Reason) or not _is_int(every) or every < 1:
            self.fail(number, seq, "checkpoint without a valid reason and interval")
            return
        if not (_is_int(seconds) or isinstance(seconds, float)) or not seconds > 0:
            self.fail(number, seq, "checkpoint without a valid interval")
            return
        trail, kid = str(details.get("trail")), str(details.get("kid"))
        if self.trail is not None and trail != self.trail:
            self.fail(number, seq, f"checkpoint of another trail ({trail}; this trail is {self.trail})")
            return
        key = self.keys.get(kid)
        if key is None and kid in self.announced and self.announced[kid][0] == trail:
            key = self.announced[kid][1]
        if key is None:
            if details.get("ephemeral"):
                self.fail(
                    number,
                    seq,
                    f"checkpoint signed with the ephemeral key {kid!r} (the runtime had no audit key): it proves "
                    "nothing unless the log collector's copy of the checkpoints (--checkpoints) announces that key",
                )
            else:
                self.fail(number, seq, f"checkpoint signed by unknown key {kid!r} (not among the public keys given)")
            return
        why = _verify_checkpoint_signature(record, key, details)
        if why:
            self.fail(number, seq, why)
            return
        if kid not in self.keys:
            self.notes.append(
                f"checkpoint seq {seq} is signed with the ephemeral key {kid!r}, trusted from the checkpoint copy"
            )
        self.trail = trail
        if reason == Reason.START and self.last_checkpoint is not None and not self.last_was_final:
            if self.span:
                self.unsigned.append(
                    f"records {self.span[0]['seq']}-{self.span[-1]['seq']} after the checkpoint at seq "
                    f"{self.last_checkpoint_seq} were not signed until the restart at seq {seq} (unclean shutdown)"
                )
            else:
                self.notes.append(
                    f"the runtime stopped without a final checkpoint after seq {self.last_checkpoint_seq} "
                    "(unclean shutdown); no record was left unsigned"
                )
        self.check_span(number, seq, None if reason == Reason.START else record.get("time"))
        self.last_checkpoint, self.last_checkpoint_seq = details, seq
        self.last_was_final = reason == Reason.FINAL
        self.span, self.span_damaged = [], False
        self.checkpoints += 1

    def check_span(self, number: int, seq: int | None, signed_at: Any) -> bool:
        """Whether the records since the last checkpoint are within the interval it carries (in
        records, and in seconds from the first of them to ``signed_at``, or to the last of them)."""
        if not self.span or self.last_checkpoint is None or self.span_damaged:
            return True
        every, seconds = self.last_checkpoint["every"], self.last_checkpoint["seconds"]
        first, last = self.span[0]["seq"], self.span[-1]["seq"]
        if len(self.span) > every:
            self.fail(
                number,
                seq,
                f"records {first}-{last} after the checkpoint at seq {self.last_checkpoint_seq} are "
                f"{len(self.span)} records, more than its interval of {every} (a checkpoint was removed, or "
                "records were added)",
                stop=False,
            )
            return False
        start, end = _timestamp(self.span[0].get("time")), _timestamp(signed_at or self.span[-1].get("time"))
        if start is None or end is None:
            self.fail(number, seq, f"records {first}-{last}: a record has no readable time", stop=False)
            return False
        if end - start > seconds + SLACK_SECONDS:
            self.fail(
                number,
                seq,
                f"records {first}-{last} after the checkpoint at seq {self.last_checkpoint_seq} were unsigned for "
                f"{end - start:.0f} s, longer than its interval of {seconds:g} s (a checkpoint was removed, or "
                "records were added)",
                stop=False,
            )
            return False
        return True

    def end(self, lines: int) -> None:
        if self.stopped:
            return
        if self.last_checkpoint is None:
            self.fail(lines + 1, None, "the trail has no checkpoint: nothing in it is signed")
        elif self.span:
            first, last = self.span[0]["seq"], self.span[-1]["seq"]
            if self.check_span(lines + 1, None, None):
                self.unsigned.append(
                    f"records {first}-{last} after the last checkpoint (seq {self.last_checkpoint_seq}) are not "
                    "signed (unclean shutdown, the runtime is still writing, or they were cut off or added)"
                )
        elif not self.last_was_final:
            self.unsigned.append(
                f"the trail ends at checkpoint seq {self.last_checkpoint_seq}, which is not a final checkpoint "
                "(unclean shutdown, or the runtime is still running): records after it may be missing"
            )

    def compare(self, shipped: list[_Shipped]) -> None:
        """Every checkpoint the log collector holds for this trail must be in the file, unchanged."""
        if self.trail is None:
            return
        mine = sorted((s for s in shipped if s.trail == self.trail), key=lambda s: s.seq)
        if not mine:
            others = sorted({s.trail for s in shipped})
            self.problems.append(
                f"the checkpoint copy holds no checkpoint of this trail ({self.trail}; it holds {others or 'none'}): "
                "the file was rewritten from scratch, or the copy is of another agent"
            )
            return
        for item in mine:
            held = self.hashes.get(item.seq)
            if held is not None and held != item.hash:
                self.problems.append(
                    f"record seq {item.seq} differs from the signed checkpoint the log collector holds (line "
                    f"{item.line} of the copy): the trail was rewritten at or before seq {item.seq}"
                )
                return
        if not self.stopped and mine[-1].seq > self.last_seq:
            self.problems.append(
                f"the trail ends at seq {self.last_seq}, but the log collector holds the signed checkpoint seq "
                f"{mine[-1].seq} (line {mine[-1].line} of the copy): records {self.last_seq + 1}-{mine[-1].seq} were "
                "cut off"
            )
            return
        matched = sum(1 for item in mine if self.hashes.get(item.seq) == item.hash)
        self.notes.append(
            f"{matched} of the {len(mine)} checkpoints the log collector holds for this trail are in it, unchanged"
        )


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        return None


def verify_trail(
    data: bytes,
    keys: KeyRing | Mapping[str, ed25519.Ed25519PublicKey],
    checkpoints: bytes | None = None,
) -> Verification:
    """Checks a trail's chain, its checkpoints' signatures with the audit public ``keys``, the
    length of every unsigned span, that it ends with a final checkpoint and, given the log
    collector's copy of the checkpoints, that every one of them is in the file unchanged."""
    public = keys.audit_public_keys if isinstance(keys, KeyRing) else dict(keys)
    shipped: list[_Shipped] = []
    announced: dict[str, tuple[str, ed25519.Ed25519PublicKey]] = {}
    copy_problems: list[str] = []
    if checkpoints is not None:
        shipped, announced, copy_problems = _read_shipped(checkpoints, public)
    declared: list[_Span] = []
    lines = list(_lines(data))
    for _, raw in lines:
        if b'"recover"' in raw:  # only recover records declare damage: parse no other line twice
            record, _ = _parse(raw)
            if record is not None:
                declared.extend(_declared_damage(record))
    walk = _Walk(public, announced, declared, data)
    for number, (offset, raw) in enumerate(lines, start=1):
        walk.line(number, offset, raw)
        if walk.stopped:
            break
    walk.end(len(lines))
    if checkpoints is not None:
        walk.problems.extend(copy_problems)
        walk.compare(shipped)
    status = Status.FAILED if walk.problems else Status.UNSIGNED if walk.unsigned else Status.VERIFIED
    line, seq, reason = walk.first_bad or (None, None, walk.problems[0] if walk.problems else "")
    return Verification(
        status,
        walk.records,
        walk.checkpoints,
        tuple(walk.problems),
        tuple(walk.unsigned),
        tuple(walk.notes),
        line,
        seq,
        reason,
    )


def verify_lines(
    lines: Iterable[str | bytes],
    keys: KeyRing | Mapping[str, ed25519.Ed25519PublicKey],
    checkpoints: bytes | None = None,
) -> Verification:
    """``verify_trail`` over the trail's lines (each with its newline)."""
    return verify_trail(b"".join(line.encode() if isinstance(line, str) else line for line in lines), keys, checkpoints)

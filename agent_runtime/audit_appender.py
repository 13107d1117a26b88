"""The audit log's appender: a small process of its own that appends batches to the trail and
fsyncs them, so that neither the disk nor this work ever holds the runtime's event loop.

A process, not a thread: a thread that returns from fsync needs the interpreter lock, which the
busy event loop holds, and handing the lock back and forth for every batch cost the loop more
than the audit's own work did (measured: about 100 µs of CPU per request, a third of it all).

Started by ``audit.AuditLog`` as ``python -I -S audit_appender.py <trail fd> <copy fd>``: the
standard library only, nothing imported from the runtime, so it starts in milliseconds and holds
a few MiB. The protocol on its stdin and stdout, little-endian:

- a batch: the trail's length before it, the length of its bytes and of the copy's (three
  unsigned 64-bit integers), then those bytes; the copy (records and checkpoints for the log
  collector) goes to the copy fd once the batch is on disk and answered, best effort;
- the answer to each batch, in order: 0 once the bytes are written and fsynced, else the errno of
  the failure, after the file was cut back to its length before the batch (no partial line stays).

It ends when its stdin ends (the runtime closed it, or died): a batch cut short is not written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys

HEADER = struct.Struct("<QQQ")
ANSWER = struct.Struct("<i")
_REQUESTS, _ANSWERS = 0, 1


def _read_exactly(size: int) -> bytes | None:
    """``size`` bytes from stdin, or None when it ends first."""
    chunks = []
    while size:
        chunk = os.read(_REQUESTS, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append(trail: int, expected: int, data: bytes) -> int:
    """0 once ``data`` is on disk after the trail's first ``expected`` bytes, else an errno. The
    file is first made ``expected`` long (what an appender that died mid-batch left beyond it is
    cut away, never chained after); a trail shorter than that was cut by someone else: refused."""
    try:
        size = os.fstat(trail).st_size
        if size < expected:
            return errno.EIO
        if size > expected:
            os.ftruncate(trail, expected)
        _write_all(trail, data)
        os.fsync(trail)
    except OSError as error:
        with contextlib.suppress(OSError):  # no partial line may stay for the next batch to run into
            os.ftruncate(trail, expected)
        return error.errno or errno.EIO
    return 0


def serve(trail: int, copy: int) -> None:
    while (header := _read_exactly(HEADER.size)) is not None:
        expected, trail_length, copy_length = HEADER.unpack(header)
        data = _read_exactly(trail_length)
        copied = _read_exactly(copy_length)
        if data is None or copied is None:
            return
        failure = _append(trail, expected, data)
        # Answered before the copy: if this process dies between the two, the runtime keeps the
        # batch (the log collector misses a copy, which is best effort); the other way round, the
        # collector would hold records the runtime then cuts from the file as unanswered.
        _write_all(_ANSWERS, ANSWER.pack(failure))
        if copied and not failure:
            with contextlib.suppress(OSError):  # on disk already: a closed stdout must not fail the requests
                _write_all(copy, copied)


def main(argv: list[str]) -> int:
    trail, copy = int(argv[1]), int(argv[2])
    with contextlib.suppress(BrokenPipeError):  # the runtime is gone: nobody waits for the answer
        serve(trail, copy)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

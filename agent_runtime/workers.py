"""CPU-bound work off the event loop: a pool of worker processes, and a deadline that stops the work.

The loop must answer ``/healthz`` within a probe's budget whatever an operation is doing, and an
operation's timeout must stop the work, not only the wait for it. A thread cannot be stopped, and a
``ProcessPoolExecutor`` breaks as a whole when one of its workers is killed; so each worker here is
a process of its own on a socket of its own. ``run`` sends the call, awaits the reply without
blocking the loop, and, if the caller stops waiting (the operation's timeout cancels it), kills the
worker with SIGKILL, waits until it is reaped and forks a fresh one in its place.

Workers fork from multiprocessing's fork server, preloaded with the operations, so a replacement
costs a fork (milliseconds), not an interpreter start; never from the server process itself, whose
threads make a plain fork unsafe. With ``eager`` (an agent that serves a CPU-bound operation) they
start with the server; otherwise with the first call that needs them (a large body to parse), so a
pod whose operations never need them does without their memory (about 50 MiB of PSS for the fork
server and two workers), and that first call pays their start (an interpreter and the preloaded
modules: about a second here). The fork server's socket lives in the temp dir (``/tmp`` in the pod,
the only writable place besides the data volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, overload

log = logging.getLogger("agent_runtime.workers")

T = TypeVar("T")
A = TypeVar("A")

# A frame: its length (8 bytes, big-endian), then a pickle: the call (function, argument) one way,
# the reply (ok, result or exception) the other.
_FRAME = struct.Struct("!Q")
# The fork server imports the program's main script once, so that no worker imports it again (as
# multiprocessing requires, the main script must do nothing when imported: the __main__ idiom).
_PRELOAD = ("__main__", __name__)
_CONTEXT = multiprocessing.get_context("forkserver")
_REAP_SECONDS = 5.0
_BUFFER_BYTES = 1024 * 1024  # replies of a megabyte or more are common (a document's text)
_RESPAWN_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 5.0)
_NICENESS = 10  # workers yield the CPU to the server's loop: probes are answered first


def default_size() -> int:
    """One worker per CPU this process may run on, at most four: the work is CPU-bound, so more
    workers than cores only share them, and each worker costs memory."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


class WorkerCrashedError(RuntimeError):
    """The worker process died during the call (out of memory, killed by someone else)."""


class Pickled:
    """A value kept as its pickle, made by a worker: the server holds it and sends it on as bytes,
    and a worker given a call holding it (anywhere in the argument) gets the value itself. So a
    large value never costs the loop more than a copy of its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _CallPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Pickled):
            return pickle.loads, (obj.data,)  # unpickled over there as the value it holds
        return NotImplemented


def _pickled_call(call: tuple[Any, ...]) -> bytes:
    buffer = io.BytesIO()
    _CallPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(call)
    return buffer.getvalue()


class _Worker:
    def __init__(self, process: BaseProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.process = process
        self.pid = process.pid or 0
        self.reader = reader
        self.writer = writer


class WorkerPool:
    """``size`` worker processes; a call waits for an idle one (its wait counts against the caller's
    deadline, as the bulkhead's does)."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or default_size()
        self.replaced = 0  # workers killed (deadline, crash) and forked again
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False
        self._preload: list[str] | None = None  # set by start(); the workers fork on the first call
        self._starting: asyncio.Task[None] | None = None
        self._started = False

    @property
    def pids(self) -> set[int]:
        """The live workers' process ids."""
        return {worker.pid for worker in self._workers}

    async def start(self, preload: Sequence[str] = (), *, eager: bool = True) -> None:
        """Starts the workers now (``eager``) or with the first call. ``preload``: modules the fork
        server imports before its first fork (the ones the calls will need)."""
        self._preload = [*_PRELOAD, *preload]
        if eager:
            await self._ensure_started()

    @property
    def started(self) -> bool:
        return self._started

    async def _ensure_started(self) -> None:
        """Starts the workers once, in a task of its own: concurrent first calls wait for the same
        start, and a caller that stops waiting (its deadline) cannot leave a fork half done."""
        if self._preload is None:
            raise RuntimeError("the worker pool was not started")
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_workers(self._preload), name="worker-pool-start")
            self._starting.add_done_callback(self._start_ended)
        await asyncio.shield(self._starting)

    def _start_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._starting = None  # the next call tries again, whether or not anyone still waited

    async def _start_workers(self, preload: list[str]) -> None:
        _CONTEXT.set_forkserver_preload(preload)
        added = await asyncio.gather(*(self._add() for _ in range(self.size)), return_exceptions=True)
        failed = [outcome for outcome in added if isinstance(outcome, BaseException)]
        if len(failed) == len(added):
            raise failed[0]
        for error in failed:  # some forked: serve with them, and fork the rest in the background
            log.error("could not fork a worker: %s", error)
            self._respawn_later()
        self._started = True

    @overload
    async def run(self, function: Callable[[A], Awaitable[T]], argument: A | Pickled) -> T: ...
    @overload
    async def run(self, function: Callable[[A], T], argument: A | Pickled) -> T: ...
    async def run(self, function: Callable[[A], Any], argument: A | Pickled) -> Any:
        """``function(argument)`` in a worker (awaited there if it is a coroutine function). Both go
        by pickle: the function by reference (a module-level function), the argument by value."""
        return await self._run(function, argument, as_json=False)

    async def run_json(self, function: Callable[[A], Any], argument: A | Pickled) -> bytes:
        """As ``run``, its result encoded as JSON by the worker (``json.dumps``, as aiohttp's
        ``json_response`` does): a large result never costs the loop its encoding."""
        encoded: bytes = await self._run(function, argument, as_json=True)
        return encoded

    async def _run(self, function: Callable[[A], Any], argument: A | Pickled, as_json: bool) -> Any:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if not self._started:
            await self._ensure_started()
        call = _pickled_call((function, argument, as_json))
        worker = await self._idle.get()
        try:
            worker.writer.write(_FRAME.pack(len(call)))
            worker.writer.write(call)
            await worker.writer.drain()
            (size,) = _FRAME.unpack(await worker.reader.readexactly(_FRAME.size))
            reply = await worker.reader.readexactly(size)
        except BaseException as error:
            # Cancelled (the deadline) or the worker died: either way it is in the middle of
            # something nobody waits for any more. It goes, and a fresh one takes its place.
            await self._discard(worker)
            if isinstance(error, asyncio.IncompleteReadError | ConnectionError):
                raise WorkerCrashedError(f"worker {worker.pid} died during the call") from None
            raise
        self._idle.put_nowait(worker)
        ok, value = pickle.loads(reply)  # noqa: S301 - written by our own worker process
        if not ok:
            raise value
        return value

    async def settled(self) -> None:
        """Returns when no replacement is being forked (the pool is back to ``size`` workers, unless
        forking failed)."""
        while self._spawning:
            await asyncio.gather(*self._spawning, return_exceptions=True)

    async def close(self) -> None:
        """Stops every worker; in-flight calls have finished by now (the server waited for them)."""
        self._closed = True
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)  # its forks end, then stop
        for task in self._spawning:
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.writer.close()  # end of input: an idle worker leaves on its own
        await asyncio.gather(*(asyncio.to_thread(_stop, worker.process) for worker in workers))

    async def _add(self) -> None:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.to_thread(_fork, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the worker has its own copy; ours would hide the worker's end of input
        reader, writer = await asyncio.open_connection(sock=parent, limit=_BUFFER_BYTES)
        worker = _Worker(process, reader, writer)
        if self._closed:
            writer.close()
            await asyncio.to_thread(_stop, process)
            return
        self._workers.add(worker)
        self._idle.put_nowait(worker)

    async def _discard(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return  # close() stops it
        self._workers.discard(worker)
        if worker.process.exitcode is None:
            worker.process.kill()
        worker.writer.close()
        if not self._closed:
            self.replaced += 1
            self._respawn_later()
        # Reaped before the caller hears of the timeout: when the 504 goes out, the work is gone.
        await asyncio.shield(asyncio.to_thread(_reap, worker.process))

    def _respawn_later(self) -> None:
        task = asyncio.create_task(self._respawn(), name="worker-respawn")
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self) -> None:
        for delay in (0.0, *_RESPAWN_BACKOFF_SECONDS):
            await asyncio.sleep(delay)
            try:
                await self._add()
                return
            except Exception:
                log.exception("could not fork a replacement worker")
        log.error("the worker pool runs with %d of %d workers", len(self._workers), self.size)


def _fork(connection: socket.socket) -> BaseProcess:
    process = _CONTEXT.Process(target=_serve, args=(connection,), name="agent-runtime-worker", daemon=True)
    process.start()
    return process


def _reap(process: BaseProcess) -> None:
    process.join(_REAP_SECONDS)
    if process.exitcode is not None:
        process.close()


def _stop(process: BaseProcess) -> None:
    process.join(1.0)  # an idle worker exits at the end of its input
    if process.exitcode is None:
        process.kill()
    _reap(process)


# --- in the worker process ---------------------------------------------------------------------


def _serve(connection: socket.socket) -> None:
    """A worker's life: read a call, run it, write the reply, until the server closes the socket."""
    # ^C, sent to the whole process group, is for the server: it lets the calls in flight finish,
    # then closes our socket. (SIGTERM keeps its default: multiprocessing stops leftovers with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    loop = asyncio.new_event_loop()
    with connection:
        while (header := _receive(connection, _FRAME.size)) is not None:
            (size,) = _FRAME.unpack(header)
            call = _receive(connection, size)
            if call is None:
                return
            reply = _call(loop, call)
            connection.sendall(_FRAME.pack(len(reply)))
            connection.sendall(reply)


def _receive(connection: socket.socket, size: int) -> bytearray | None:
    """Exactly ``size`` bytes, or None at the end of input. The buffer itself, not a bytes copy of
    it: a call's argument can be tens of megabytes, and pickle reads a bytearray as well."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = connection.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return buffer


def _call(loop: asyncio.AbstractEventLoop, call: bytearray) -> bytes:
    try:
        function, argument, as_json = pickle.loads(call)  # noqa: S301 - written by the server that forked us
        result = function(argument)
        if inspect.isawaitable(result):
            result = loop.run_until_complete(result)
        if as_json:
            result = json.dumps(result).encode()
        return pickle.dumps((True, result), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        return _error_reply(error)


def _error_reply(error: Exception) -> bytes:
    """The exception itself when it survives the trip (InputError becomes a 422 over there), else
    a RuntimeError naming it."""
    with contextlib.suppress(Exception):
        reply = pickle.dumps((False, error), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(reply)  # noqa: S301 - our own bytes: an exception must also rebuild
        return reply
    return pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))

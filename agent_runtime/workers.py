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
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, SupportsIndex, TypeVar, cast, overload

import orjson

log = logging.getLogger("agent_runtime.workers")

T = TypeVar("T")
B = TypeVar("B", bytes, bytearray)
A = TypeVar("A")

# A frame, either way: a header (the pickle's length and how many bulk buffers follow, then each
# one's length), the pickle (the call one way, the reply the other), then the bulk buffers (see _Bulk).
_HEADER = struct.Struct("!QI")
_LENGTH = struct.Struct("!Q")
_YIELD_BYTES = 4 * 1024 * 1024  # the loop gives way at least this often while reading a reply
# The fork server imports the program's main script once, so that no worker imports it again (as
# multiprocessing requires, the main script must do nothing when imported: the __main__ idiom).
_PRELOAD = ("__main__", __name__)
_CONTEXT = multiprocessing.get_context("forkserver")
_REAP_SECONDS = 5.0
_RESPAWN_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 5.0)
_NICENESS = 10  # workers yield the CPU to the server's loop: probes are answered first


def default_size() -> int:
    """One worker per CPU this process may run on, at most four: the work is CPU-bound, so more
    workers than cores only share them, and each worker costs memory."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def json_bytes(value: Any) -> bytes:
    """A JSON answer's body: orjson on the hot path (a tenth of json's cost), json for what orjson
    refuses (an int beyond 64 bits, a key that is not a string). Either way NaN and infinities are
    written as null, as orjson writes them: json's ``NaN`` is not JSON, and no client parses it."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(_finite(value), allow_nan=False).encode()


def _key(key: Any) -> Any:
    return (
        key
        if not isinstance(key, float) or math.isfinite(key)
        else repr(key).replace("inf", "Infinity").replace("nan", "NaN")
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):  # a key is a string in JSON: a NaN key stays the key "NaN"
        return {_key(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class WorkerCrashedError(RuntimeError):
    """The worker process died during the call (out of memory, killed by someone else)."""


class _Bulk:
    """Bytes that cross to a worker (or back) beside the frame's pickle, not inside it: written
    from where they are and read into the buffer the other side keeps, so neither side copies them
    (a 70 MB body was copied three times on the way: the pickle, a stream's buffer, the unpickling).
    The other side gets the bytes themselves, as a bytearray; bytes not wrapped stay in the pickle,
    so nothing else changes type on the way."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # A PickleBuffer goes out of band under protocol 5 with a buffer_callback (no Python is
        # called per object); while it lives, a bytearray under it cannot be resized. Under an
        # older protocol (copy and deepcopy ask for 4) the bytes are plain arguments.
        if int(protocol) < 5:
            return _unbulk, (self.data,)
        return _unbulk, (pickle.PickleBuffer(self.data),)


def bulk(data: B) -> B:
    """``data``, to cross to a worker beside the call's pickle (see _Bulk). Typed as the bytes
    themselves, which is what the worker's function gets (as a bytearray); only for a value sent
    to a worker, never for one used in this process."""
    return cast(B, _Bulk(data))


def _unbulk(data: Any) -> bytes | bytearray:
    """_Bulk's bytes as they arrive: the bytearray received (which the unpickler hands over as a
    read-only view of it), or bytes where the pickle held them in band."""
    return cast(bytes | bytearray, data.obj if isinstance(data, memoryview) else data)


class Pickled:
    """A value kept as its pickle, made by a worker: the server holds it and sends it on as bytes,
    and a worker given a call holding it (anywhere in the argument) gets the value itself. So a
    large value never costs the loop more than a copy of its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        if int(protocol) < 5:  # copy and deepcopy
            return Pickled, (self.data,)
        return Pickled, (_Bulk(self.data),)  # its bytes beside the pickle, both ways


class _CallPickler(pickle.Pickler):
    """A call's pickler: a Pickled in it reaches the worker as the value it holds. (A reply's
    Pickled stays one: the server holds its bytes and never looks inside.)"""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Pickled):
            return pickle.loads, (_Bulk(obj.data),)  # unpickled over there as the value it holds
        return NotImplemented


# At most this many bulk buffers, and this many bytes, in a frame: a header announcing more is out
# of step (a torn or stray write), not a call, and is refused before anything is allocated for it.
_MAX_BULK = 64
_MAX_FRAME_BYTES = 1 << 30


def _frame(value: Any, pickler_class: type[pickle.Pickler] = pickle.Pickler) -> list[Any]:
    """A frame's pieces, to send in order: its header and pickle as one piece, then its bulk
    buffers (the PickleBuffers of the _Bulk values in it)."""
    buffer = io.BytesIO()
    bulk: list[pickle.PickleBuffer] = []
    pickler_class(buffer, protocol=5, buffer_callback=bulk.append).dump(value)
    if len(bulk) > _MAX_BULK:
        raise ValueError(f"a call or reply holds {len(bulk)} bulk values, more than {_MAX_BULK}")
    data = buffer.getvalue()
    views = [piece.raw() for piece in bulk]  # flat byte views (what a socket's send takes)
    if len(data) + sum(view.nbytes for view in views) > _MAX_FRAME_BYTES:
        raise ValueError(f"a call or reply of more than {_MAX_FRAME_BYTES} bytes")
    lengths = b"".join(_LENGTH.pack(view.nbytes) for view in views)
    return [_HEADER.pack(len(data), len(views)) + lengths + data, *views]


def _unframe(data: bytearray, bulk: list[bytearray]) -> Any:
    return pickle.loads(data, buffers=bulk)  # noqa: S301 - written by our own worker or server


class _Worker:
    def __init__(self, process: BaseProcess, connection: socket.socket) -> None:
        self.process = process
        self.pid = process.pid or 0
        self.connection = connection  # non-blocking; used through the loop's sock_* calls


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
        """As ``run``, its result encoded as JSON by the worker (``json_bytes``, as the loop encodes
        its answers): a large result never costs the loop its encoding."""
        encoded: bytes = await self._run(function, argument, as_json=True)
        return encoded

    async def _run(self, function: Callable[[A], Any], argument: A | Pickled, as_json: bool) -> Any:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if not self._started:
            await self._ensure_started()
        pieces = _frame((function, argument, as_json), _CallPickler)
        worker = await self._idle.get()
        loop = asyncio.get_running_loop()
        try:
            for piece in pieces:  # sent from where they are: no copy (a stream writer would make one)
                await loop.sock_sendall(worker.connection, piece)
            reply = await _receive_frame_async(loop, worker.connection)
        except BaseException as error:
            # Cancelled (the deadline) or the worker died: either way it is in the middle of
            # something nobody waits for any more. It goes, and a fresh one takes its place.
            await self._discard(worker)
            if isinstance(error, EOFError | ConnectionError):
                raise WorkerCrashedError(f"worker {worker.pid} died during the call") from None
            raise
        self._idle.put_nowait(worker)
        ok, value = _unframe(*reply)
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
            worker.connection.close()  # end of input: an idle worker leaves on its own
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
        parent.setblocking(False)
        worker = _Worker(process, parent)
        if self._closed:
            parent.close()
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
        worker.connection.close()
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
        while True:
            try:
                call = _receive_frame(connection)
            except EOFError:  # the server closed the socket: the pool is closing
                return
            for piece in _call(loop, call):
                connection.sendall(piece)


# --- frames, read by either side ---------------------------------------------------------------


def _receive_frame(connection: socket.socket) -> tuple[bytearray, list[bytearray]]:
    """A frame from a blocking socket (the worker's side); EOFError at the end of input."""
    size, count = _checked_header(_receive(connection, _HEADER.size))
    lengths = _checked_lengths(size, _receive(connection, _LENGTH.size * count))
    data = _receive(connection, size)
    bulk = [_receive(connection, length) for length in lengths]
    return data, bulk


async def _receive_frame_async(
    loop: asyncio.AbstractEventLoop, connection: socket.socket
) -> tuple[bytearray, list[bytearray]]:
    """A frame from a non-blocking socket (the server's side), without blocking the loop."""
    size, count = _checked_header(await _receive_async(loop, connection, _HEADER.size))
    lengths = _checked_lengths(size, await _receive_async(loop, connection, _LENGTH.size * count))
    data = await _receive_async(loop, connection, size)
    bulk = [await _receive_async(loop, connection, length) for length in lengths]
    return data, bulk


def _checked_header(header: bytearray) -> tuple[int, int]:
    size, count = _HEADER.unpack(header)
    if count > _MAX_BULK or size > _MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame header announces {size} bytes and {count} bulk buffers: out of step")
    return size, count


def _checked_lengths(size: int, lengths: bytearray) -> list[int]:
    sizes = [length for (length,) in _LENGTH.iter_unpack(lengths)]
    if size + sum(sizes) > _MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame announces {size + sum(sizes)} bytes in all: out of step")
    return sizes


def _receive(connection: socket.socket, size: int) -> bytearray:
    """Exactly ``size`` bytes, received into the buffer that is returned (no copy of it is made:
    a call's argument can be tens of megabytes); EOFError at the end of input."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = connection.recv_into(view[received:])
        if count == 0:
            raise EOFError
        received += count
    return buffer


async def _receive_async(loop: asyncio.AbstractEventLoop, connection: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = yielded = 0
    while received < size:
        count = await loop.sock_recv_into(connection, view[received:])
        if count == 0:
            raise EOFError
        received += count
        if received - yielded >= _YIELD_BYTES:
            # asyncio's sock_recv_into returns at once when data is waiting, without giving way:
            # a fast worker's large reply would otherwise be read with the loop held throughout.
            yielded = received
            await asyncio.sleep(0)
    return buffer


# --- in the worker process, again --------------------------------------------------------------


def _call(loop: asyncio.AbstractEventLoop, call: tuple[bytearray, list[bytearray]]) -> list[Any]:
    """The reply frame to a call frame."""
    try:
        function, argument, as_json = _unframe(*call)
        result = function(argument)
        if inspect.isawaitable(result):
            result = loop.run_until_complete(result)
        if as_json:
            result = _Bulk(json_bytes(result))  # an answer can be megabytes: beside the pickle
        return _frame((True, result))
    except Exception as error:
        return _error_reply(error)


def _error_reply(error: Exception) -> list[Any]:
    """The exception itself when it survives the trip (InputError becomes a 422 over there), else
    a RuntimeError naming it."""
    with contextlib.suppress(Exception):
        reply = _frame((False, error))
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301 - our own bytes: an exception must also rebuild
        return reply
    return _frame((False, RuntimeError(f"{type(error).__name__}: {error}")))

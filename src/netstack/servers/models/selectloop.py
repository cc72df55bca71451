"""An event loop written from scratch on :mod:`selectors`: no asyncio anywhere.

Theory of operation
-------------------
The loop runs *callbacks*. Everything else (timers, socket readiness, coroutine tasks) is
a way of deciding *when* a callback goes on the ready queue.

Structures::

    _ready     deque[Handle]          callbacks to run in the next iteration, FIFO
    _timers    heap of TimerHandle    ordered by (when, seq); seq breaks ties FIFO
    _selector  DefaultSelector        fd -> (reader Handle | None, writer Handle | None)

One iteration (:meth:`SelectLoop._run_once`):

1. Choose how long to block: 0 if ``_ready`` is not empty or :meth:`stop` was called;
   otherwise until the earliest live timer; otherwise forever.
2. ``select(timeout)``: for each ready fd, append its reader and/or writer handle to
   ``_ready``.
3. Move every timer whose time has come from the heap to ``_ready``, in heap order.
4. Run exactly the handles that are in ``_ready`` now. Callbacks scheduled while they run
   wait for the next iteration, so a callback that reschedules itself cannot starve I/O.

Handles are cancelled lazily: :meth:`Handle.cancel` only sets a flag and the loop skips
cancelled handles when it meets them. A cancelled timer stays in the heap until it reaches
the top; when more than half the heap (and over 100 entries) is cancelled the heap is
rebuilt, so a stream of set-then-cancelled timeouts cannot grow it without limit.

Tasks. A :class:`Task` drives a coroutine (an ``async def``) by calling
``coro.send(None)``. The coroutine runs until it awaits a :class:`Future` that is not done;
``Future.__await__`` then *yields the future itself* out through every ``await`` up to
:meth:`Task._step`, which adds ``Task._wakeup`` as the future's done callback and returns
to the loop. The task is now suspended: it is in no queue, only referenced by that
future's callbacks. When something completes the future (a readiness callback, a timer, a
``set_result`` from another task), its done callbacks are put on ``_ready``; the next
iteration runs ``_wakeup``, which calls ``_step`` again; ``coro.send(None)`` resumes the
coroutine inside ``Future.__await__``, which returns the future's result or raises its
exception at the ``await``.

Waiting for a socket (:meth:`SelectLoop.sock_recv` and friends) tries the syscall first.
Only on ``EAGAIN`` does it create a future, register a reader (or writer) callback for
the fd that completes it, await it, and unregister in a ``finally`` (so a cancelled wait
leaves no registration behind). Registration is level-triggered: until it is removed the
fd keeps being reported ready, so the callback tolerates a future that is already done.
The price, measured with ``perf stat`` on the echo server (bench/RESULTS.md): a
ping-pong message costs a failed ``recv``, ``epoll_ctl`` ADD, ``epoll_wait``, the real
``recv``, ``epoll_ctl`` DEL and ``send``, about 7 syscalls with one connection and 5 with
50 (one ``epoll_wait`` then serves many fds). uvloop keeps the fd registered for the
connection's life and needs 3, then 2.

Cancellation. :meth:`Task.cancel` cancels the future the task waits on (its
``__await__`` then raises :class:`CancelledError` into the coroutine) or, if the task is
only scheduled, throws :class:`CancelledError` in at its next step; a task that cancels
itself while running has the future it next parks on cancelled. A coroutine may catch
it to clean up. A task that ends with :class:`CancelledError` is cancelled; awaiting it,
or asking its result, raises :class:`CancelledError`.

Invariants:

* Only the thread running the loop touches its structures, except
  :meth:`SelectLoop.call_soon_threadsafe`, which appends to the deque (atomic under the
  GIL) and writes a byte to a self-pipe so that a blocked ``select`` returns.
* A task is in exactly one place: running, on ``_ready`` (a scheduled ``_step``), or
  waiting in one future's callback list. A future completes once; done callbacks run
  from the ready queue, never inline, so completing a future never re-enters a task.
* An fd has at most one reader and one writer; ``select`` always sees the union of both.
* An exception escaping a plain callback is logged at ERROR and the loop goes on (one
  bad connection never kills a listener); an exception escaping a task's coroutine is
  stored in the task and re-raised to whoever awaits it or calls ``result()``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution
_MIN_CANCELLED_TIMERS = 100  # asyncio's threshold for rebuilding the heap


class CancelledError(BaseException):
    """A task or future was cancelled (a ``BaseException``, so ``except Exception`` in a
    coroutine does not swallow it by accident, as in asyncio since 3.8)."""


class InvalidStateError(Exception):
    """A future was completed twice, or its result asked for before it was done."""


class Handle:
    """A callback with its arguments, scheduled on a loop; :meth:`cancel` to drop it."""

    __slots__ = ("_args", "_callback", "_cancelled")

    def __init__(self, callback: Callable[..., object], args: tuple[object, ...]) -> None:
        self._callback = callback
        self._args = args
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Do not run the callback (a no-op once it has run)."""
        self._cancelled = True

    def _run(self) -> None:
        try:
            self._callback(*self._args)
        except Exception:
            logger.error("! exception in callback %r", self._callback, exc_info=True)


class TimerHandle(Handle):
    """A handle due at ``when`` (loop time); ordered by ``(when, seq)`` in the heap."""

    __slots__ = ("_loop", "_scheduled", "_seq", "when")

    def __init__(
        self,
        when: float,
        seq: int,
        callback: Callable[..., object],
        args: tuple[object, ...],
        loop: SelectLoop,
    ) -> None:
        super().__init__(callback, args)
        self.when = when
        self._seq = seq
        self._loop = loop
        self._scheduled = True  # in the heap; cleared when the loop pops it

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            if self._scheduled:
                self._loop._timer_cancelled()


_PENDING, _DONE, _CANCELLED = "pending", "done", "cancelled"


class Future(Generic[T]):
    """A result that will exist later. ``await fut`` suspends the awaiting task until then.

    Args:
        loop: the loop that runs the done callbacks.
    """

    def __init__(self, loop: SelectLoop) -> None:
        self._loop = loop
        self._state = _PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], object]] = []

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> T:
        """Return the result, or raise the exception the future holds.

        Raises:
            CancelledError: the future was cancelled.
            InvalidStateError: it is not done yet.
        """
        if self._state == _CANCELLED:
            raise CancelledError
        if self._state == _PENDING:
            raise InvalidStateError("result is not ready")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]  # set by set_result when DONE

    def exception(self) -> BaseException | None:
        """Return the stored exception (``None`` on success); same errors as result()."""
        if self._state == _CANCELLED:
            raise CancelledError
        if self._state == _PENDING:
            raise InvalidStateError("exception is not set yet")
        return self._exception

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(self)`` from the ready queue once done (soon, if it already is)."""
        if self.done():
            self._loop.call_soon(fn, self)
        else:
            self._callbacks.append(fn)

    def set_result(self, result: T) -> None:
        self._complete(_DONE)
        self._result = result
        self._schedule_callbacks()

    def set_exception(self, exc: BaseException) -> None:
        self._complete(_DONE)
        self._exception = exc
        self._schedule_callbacks()

    def cancel(self) -> bool:
        """Cancel unless done; return whether it is now cancelled by this call."""
        if self.done():
            return False
        self._state = _CANCELLED
        self._schedule_callbacks()
        return True

    def _complete(self, state: str) -> None:
        if self._state != _PENDING:
            raise InvalidStateError(f"future already {self._state}")
        self._state = state

    def _schedule_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._loop.call_soon(fn, self)

    def __await__(self) -> Generator[Future[T], None, T]:
        if not self.done():
            yield self  # travels up to Task._step, which parks the task on this future
        return self.result()


class _Yield:
    """``await _Yield()`` gives other ready callbacks a turn (``sleep(0)``)."""

    def __await__(self) -> Generator[None, None, None]:
        yield None


class Task(Future[T]):
    """Runs a coroutine on the loop; itself a future holding the coroutine's outcome."""

    def __init__(self, coro: Coroutine[Any, Any, T], loop: SelectLoop) -> None:
        super().__init__(loop)
        self._coro = coro
        self._waiting_on: Future[Any] | None = None
        self._must_cancel = False
        loop.call_soon(self._step)

    def cancel(self) -> bool:
        """Ask the coroutine to stop: :class:`CancelledError` is raised at its ``await``.

        Returns:
            False if the task is already done.
        """
        if self.done():
            return False
        if self._waiting_on is not None and self._waiting_on.cancel():
            return True  # _wakeup follows; the await raises CancelledError
        # Not parked on a future: either a _step is scheduled (it throws CancelledError
        # in) or the task is running and cancelling itself (_step applies it on return).
        self._must_cancel = True
        return True

    def _step(self, exc: BaseException | None = None) -> None:
        if self.done():
            return
        self._waiting_on = None
        if self._must_cancel:
            self._must_cancel = False
            exc = CancelledError()
        self._loop._current = self
        try:
            try:
                yielded = self._coro.send(None) if exc is None else self._coro.throw(exc)
            finally:
                self._loop._current = None
        except StopIteration as stop:
            self.set_result(stop.value)
        except CancelledError:
            super().cancel()
        except (KeyboardInterrupt, SystemExit) as err:
            self.set_exception(err)
            raise
        except BaseException as err:
            self.set_exception(err)
        else:
            if yielded is None:  # a bare yield (sleep(0)): run again next iteration
                self._loop.call_soon(self._step)
            elif isinstance(yielded, Future) and yielded._loop is self._loop:
                self._waiting_on = yielded
                yielded.add_done_callback(self._wakeup)
                # cancel() called by the task on itself while it ran: apply it now.
                if self._must_cancel and yielded.cancel():
                    self._must_cancel = False
            else:  # awaiting something foreign (an asyncio future, say): a bug in the caller
                bad = RuntimeError(f"task awaited {yielded!r}, not a future of its loop")
                self._loop.call_soon(self._step, bad)

    def _wakeup(self, _future: Future[Any]) -> None:
        # The outcome is read by Future.__await__ inside the coroutine, not passed here.
        self._step()


class SelectLoop:
    """A single-threaded event loop on :class:`selectors.DefaultSelector`.

    Use :meth:`run_until_complete` with a coroutine, or :meth:`run_forever` and
    :meth:`stop`. Call :meth:`close` when done (it closes the selector and self-pipe).
    """

    def __init__(self) -> None:
        self._ready: collections.deque[Handle] = collections.deque()
        self._timers: list[TimerHandle] = []
        self._cancelled_timers = 0
        self._seq = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._running = False
        self._stopping = False
        self._closed = False
        self._current: Task[Any] | None = None
        # Self-pipe: call_soon_threadsafe writes a byte here so a blocked select() returns.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r, self._drain_wakeups)

    # ------------------------------------------------------------------ scheduling

    def time(self) -> float:
        """The loop's clock (``time.monotonic``), in seconds."""
        return time.monotonic()

    def call_soon(self, callback: Callable[..., object], *args: object) -> Handle:
        """Run ``callback(*args)`` in the next iteration, after those already queued."""
        handle = Handle(callback, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: object) -> Handle:
        """:meth:`call_soon` from another thread; wakes the loop if it is blocked."""
        handle = self.call_soon(callback, *args)
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
            self._wake_w.send(b"\0")
        return handle

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: object
    ) -> TimerHandle:
        """Run ``callback(*args)`` after ``delay`` seconds; returns a cancellable handle."""
        return self.call_at(self.time() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> TimerHandle:
        """Run ``callback(*args)`` at loop time ``when``; equal times run in call order."""
        timer = TimerHandle(when, next(self._seq), callback, args, self)
        heapq.heappush(self._timers, timer)
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1

    def current_task(self) -> Task[Any] | None:
        """The task whose coroutine is running now, or ``None`` from a plain callback."""
        return self._current

    def create_future(self) -> Future[Any]:
        return Future(self)

    def create_task(self, coro: Coroutine[Any, Any, T]) -> Task[T]:
        """Wrap ``coro`` in a :class:`Task`; its first step runs in the next iteration."""
        self._check_closed()
        return Task(coro, self)

    # ------------------------------------------------------------------ readiness

    def add_reader(
        self, fileobj: socket.socket | int, callback: Callable[..., object], *args: object
    ) -> Handle:
        """Call ``callback(*args)`` each iteration while ``fileobj`` is readable."""
        return self._add(fileobj, selectors.EVENT_READ, Handle(callback, args))

    def add_writer(
        self, fileobj: socket.socket | int, callback: Callable[..., object], *args: object
    ) -> Handle:
        """Call ``callback(*args)`` each iteration while ``fileobj`` is writable."""
        return self._add(fileobj, selectors.EVENT_WRITE, Handle(callback, args))

    def remove_reader(self, fileobj: socket.socket | int) -> bool:
        """Stop watching ``fileobj`` for reading; return whether it was watched."""
        return self._remove(fileobj, selectors.EVENT_READ)

    def remove_writer(self, fileobj: socket.socket | int) -> bool:
        """Stop watching ``fileobj`` for writing; return whether it was watched."""
        return self._remove(fileobj, selectors.EVENT_WRITE)

    def _add(self, fileobj: socket.socket | int, event: int, handle: Handle) -> Handle:
        self._check_closed()
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            data = (handle, None) if event == selectors.EVENT_READ else (None, handle)
            self._selector.register(fileobj, event, data)
        else:
            reader, writer = key.data
            if event == selectors.EVENT_READ:
                if reader is not None:
                    reader.cancel()
                reader = handle
            else:
                if writer is not None:
                    writer.cancel()
                writer = handle
            self._selector.modify(fileobj, key.events | event, (reader, writer))
        return handle

    def _remove(self, fileobj: socket.socket | int, event: int) -> bool:
        if self._closed:
            return False
        try:
            key = self._selector.get_key(fileobj)
        except KeyError:
            return False
        reader, writer = key.data
        if event == selectors.EVENT_READ:
            old, reader = reader, None
        else:
            old, writer = writer, None
        if old is None:
            return False
        old.cancel()
        mask = key.events & ~event
        if mask:
            self._selector.modify(fileobj, mask, (reader, writer))
        else:
            self._selector.unregister(fileobj)
        return True

    async def _wait_fd(self, sock: socket.socket, event: int) -> None:
        fut: Future[None] = self.create_future()
        self._add(sock, event, Handle(_resolve, (fut, None)))
        try:
            await fut
        finally:
            self._remove(sock, event)

    async def sock_recv(self, sock: socket.socket, nbytes: int) -> bytes:
        """Receive up to ``nbytes`` from a non-blocking socket; ``b""`` means EOF."""
        while True:
            try:
                return sock.recv(nbytes)
            except (BlockingIOError, InterruptedError):
                pass
            await self._wait_fd(sock, selectors.EVENT_READ)

    async def sock_sendall(self, sock: socket.socket, data: bytes) -> None:
        """Send all of ``data`` on a non-blocking socket, waiting while its buffer is full."""
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            view = view[sent:]
            if view:
                await self._wait_fd(sock, selectors.EVENT_WRITE)

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        """Accept a connection on a non-blocking listener; the new socket is non-blocking."""
        while True:
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock, selectors.EVENT_READ)
                continue
            conn.setblocking(False)
            return conn, address

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        """Connect a non-blocking socket.

        Raises:
            OSError: the connection failed (refused, unreachable).
        """
        err = sock.connect_ex(address)
        if err == 0:
            return
        if err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(err, f"connect to {address!r} failed: {os.strerror(err)}")
        await self._wait_fd(sock, selectors.EVENT_WRITE)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {address!r} failed: {os.strerror(err)}")

    async def sleep(self, delay: float, result: T | None = None) -> T | None:
        """Suspend the calling task for ``delay`` seconds (``0``: let others run once)."""
        if delay <= 0:
            await _Yield()
            return result
        fut: Future[T | None] = self.create_future()
        timer = self.call_later(delay, _resolve, fut, result)
        try:
            return await fut
        finally:
            timer.cancel()

    # ------------------------------------------------------------------ running

    def run_forever(self) -> None:
        """Run iterations until :meth:`stop` is called."""
        self._check_closed()
        if self._running:
            raise RuntimeError("the loop is already running")
        self._running = True
        try:
            while True:
                self._run_once()
                if self._stopping:
                    break
        finally:
            self._stopping = False
            self._running = False

    def run_until_complete(self, awaitable: Coroutine[Any, Any, T] | Future[T]) -> T:
        """Run until ``awaitable`` is done and return its result (or raise its exception).

        Raises:
            RuntimeError: :meth:`stop` was called before it finished.
        """
        future = awaitable if isinstance(awaitable, Future) else self.create_task(awaitable)
        future.add_done_callback(lambda _f: self.stop())
        self.run_forever()
        if not future.done():
            raise RuntimeError("the loop stopped before the future completed")
        return future.result()

    def stop(self) -> None:
        """Finish the current iteration, then return from :meth:`run_forever`."""
        self._stopping = True

    def is_running(self) -> bool:
        return self._running

    def close(self) -> None:
        """Release the selector and self-pipe. Pending callbacks are dropped."""
        if self._running:
            raise RuntimeError("cannot close a running loop")
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        self._timers.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("the loop is closed")

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_once(self) -> None:
        timers = self._timers
        if self._cancelled_timers > _MIN_CANCELLED_TIMERS and self._cancelled_timers * 2 > len(
            timers
        ):
            live = []
            for timer in timers:
                if timer._cancelled:
                    timer._scheduled = False
                else:
                    live.append(timer)
            heapq.heapify(live)
            self._timers = timers = live
            self._cancelled_timers = 0
        while timers and timers[0]._cancelled:
            heapq.heappop(timers)._scheduled = False
            self._cancelled_timers -= 1

        timeout: float | None = None
        if self._ready or self._stopping:
            timeout = 0
        elif timers:
            timeout = max(0.0, timers[0].when - self.time())

        ready = self._ready
        for key, mask in self._selector.select(timeout):
            reader, writer = key.data
            if mask & selectors.EVENT_READ and reader is not None:
                ready.append(reader)
            if mask & selectors.EVENT_WRITE and writer is not None:
                ready.append(writer)

        end = self.time() + _CLOCK_RESOLUTION
        while timers and timers[0].when <= end:
            timer = heapq.heappop(timers)
            timer._scheduled = False
            if timer._cancelled:
                self._cancelled_timers -= 1
            else:
                ready.append(timer)

        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()


def _resolve(fut: Future[T], result: T) -> None:
    if not fut.done():  # level-triggered readiness may report a done future again
        fut.set_result(result)

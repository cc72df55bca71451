"""The lost-update race that ``Stats`` guards against, made reproducible.

``counter.value += 1`` is three steps: read the value, add one, write it back. If a
thread is switched out between its read and its write, another thread's increments in
that window are overwritten: they are *lost*. CPython switches threads only every few
milliseconds (``sys.getswitchinterval()``), so the plain ``+=`` loses updates rarely and
irregularly. :func:`increment_unsafe` makes the window explicit: ``time.sleep(0)``
between the read and the write releases the GIL, so another thread runs right there,
and with a few threads updates are lost on every run. :func:`increment_locked` holds a
``threading.Lock`` (a mutex) across the same three steps, so no thread can read until
the previous writer has written: nothing is lost, however the threads interleave.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class Counter:
    """A shared integer, with the mutex that the locked variant uses."""

    def __init__(self) -> None:
        self.value = 0
        self.lock = threading.Lock()


def increment_unsafe(counter: Counter) -> None:
    value = counter.value  # read
    time.sleep(0)  # yield the GIL inside the read-modify-write window
    counter.value = value + 1  # write, possibly over another thread's update


def increment_locked(counter: Counter) -> None:
    with counter.lock:  # the same three steps, now indivisible
        value = counter.value
        time.sleep(0)
        counter.value = value + 1


def hammer(increment: Callable[[Counter], None], threads: int, per_thread: int) -> int:
    """Run ``threads`` threads, each calling ``increment`` ``per_thread`` times; return the
    final counter value."""
    counter = Counter()
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()  # start together so the threads really overlap
        for _ in range(per_thread):
            increment(counter)

    workers = [threading.Thread(target=work, name=f"race-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counter.value


@dataclass(frozen=True, slots=True)
class RaceResult:
    """Outcome of :func:`demonstrate`.

    Attributes:
        expected: threads x increments per thread.
        unsafe: the final count without the lock.
        locked: the final count with the lock.
    """

    threads: int
    per_thread: int
    expected: int
    unsafe: int
    locked: int

    @property
    def lost(self) -> int:
        """Updates lost without the lock."""
        return self.expected - self.unsafe

    @property
    def lost_locked(self) -> int:
        return self.expected - self.locked


def demonstrate(threads: int = 4, per_thread: int = 1_000) -> RaceResult:
    """Count to ``threads * per_thread`` without and then with the mutex."""
    return RaceResult(
        threads=threads,
        per_thread=per_thread,
        expected=threads * per_thread,
        unsafe=hammer(increment_unsafe, threads, per_thread),
        locked=hammer(increment_locked, threads, per_thread),
    )

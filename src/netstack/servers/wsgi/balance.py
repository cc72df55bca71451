"""Shared connection counts that let pre-fork workers split connections evenly.

Why
---
The workers share one listening socket per address. The kernel wakes every worker waiting
on it, and the one that is already awake (serving its connections) wins nearly every race:
``netstack serve --workers 2`` under ``wrk -c50`` ended up with splits like 50/0 or 38/12.
Per-worker ``SO_REUSEPORT`` sockets would spread connections, but a worker's accept queue
dies with it, which breaks the SIGHUP roll's promise that no connection is refused.

How
---
The master maps a small :class:`LoadTable` (anonymous ``MAP_SHARED`` memory, so every
forked worker sees the same bytes) before forking: one slot per worker, five int64 cells.

=========== =============================================================== ==========
cell        meaning                                                         written by
=========== =============================================================== ==========
pid         the worker's pid, 0 for a free slot                             master
accepting   CLOSED (booting, stopping), LISTENING or PAUSED                 the worker
connections its open connections                                            the worker
accepted    connections it has admitted so far (shows that it makes         the worker
            progress)
wake        set by a peer that sent the wake signal, cleared on receipt     both
=========== =============================================================== ==========

The master writes a slot only before its worker is forked and after it was reaped; the
other cells have one writer each (an aligned 8-byte store is atomic), so no lock is needed.
A stale read costs at most one connection of balance.

Each worker (:class:`LoadSlot`) listens on ``dup()`` copies of the shared sockets. After
admitting a connection it publishes its count and compares it with the least loaded live
peer: above that plus :func:`slack` (``max(2, 10 %)``), or at its ``max_connections``
while that peer holds fewer, it *pauses*: it closes its asyncio servers (the copies; the
shared sockets keep listening for the peers) and the waiting connections go to the others.
If that least loaded peer is paused itself, it is sent :data:`WAKE_SIGNAL`: it now holds
fewer connections than a listening peer, so it listens again at once. A paused worker also
looks every :data:`PAUSE` (up to :data:`MAX_PAUSE` while nothing changes) and listens
again once back within its share. A peer that accepts nothing for :data:`STALL` while
connections wait in the accept queue (an app blocking its event loop with ``--threads 0``,
a stopped process) is *stalled*: ignored until it accepts again, so the paused worker
listens again and new connections wait at most about ``STALL``.

A single worker has no table and runs exactly as before. The slack of at least 2 (not 1)
keeps ``Connection: close`` loads, whose small counts jitter all the time, from pausing
and resuming on every other connection (measured: 150 instead of 2,700 pauses in 3 s).
With TLS a connection counts once its handshake is done (that is when asyncio calls
``connection_made``). With the plain asyncio loop (no uvloop) one readiness event accepts
every waiting connection, so a burst is split less finely than with uvloop.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import struct
from typing import Final

# Cells of a slot.
PID, ACCEPTING, CONNECTIONS, ACCEPTED, WAKE = range(5)
CELLS: Final = 5
# What a worker sends a paused peer that now holds fewer connections than itself. Its
# default action is to ignore it, so a stray one (a pid reused meanwhile) harms nobody.
# POSIX only, as is the fork that makes a table useful.
WAKE_SIGNAL: Final[int] = getattr(signal, "SIGURG", 0)
# Values of the ACCEPTING cell.
CLOSED, LISTENING, PAUSED = 0, 1, 2
# How long a worker that holds more than its share stops accepting before it looks again;
# while nothing changes it looks less often, down to every MAX_PAUSE.
PAUSE: Final = 0.005
MAX_PAUSE: Final = 0.02
# A peer that accepted nothing for this long while connections waited is stalled (an app
# blocking its loop): the others ignore it until it accepts again.
STALL: Final = 0.05


def slack(least: int) -> int:
    """Connections a worker may hold above the least loaded one: ``max(2, 10 %)``."""
    return max(2, least // 10)


class LoadTable:
    """The master's view: ``size`` slots in anonymous shared memory (inherited by fork)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(-1, size * CELLS * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self.cells = memoryview(self._map).cast("q")

    def claim(self) -> int | None:
        """Reserve a free slot for a worker about to be forked; ``None`` when full."""
        cells = self.cells
        for index in range(self.size):
            base = index * CELLS
            if cells[base + PID] == 0:
                cells[base : base + CELLS] = memoryview(bytes(CELLS * 8)).cast("q")
                cells[base + PID] = -1  # reserved until the fork returns the pid
                return index
        return None

    def assign(self, index: int, pid: int) -> None:
        self.cells[index * CELLS + PID] = pid

    def release(self, index: int) -> None:
        """Forget a reaped worker: its slot no longer counts and is free again."""
        base = index * CELLS
        self.cells[base : base + CELLS] = memoryview(bytes(CELLS * 8)).cast("q")

    def row(self, index: int) -> tuple[int, ...]:
        """A slot's cells (pid, accepting, connections, accepted, wake)."""
        base = index * CELLS
        return tuple(self.cells[base : base + CELLS])

    def close(self) -> None:
        self.cells.release()
        self._map.close()


class LoadSlot:
    """One worker's slot in a :class:`LoadTable`, and its view of the others."""

    def __init__(self, table: LoadTable, index: int) -> None:
        self.cells = table.cells
        self.base = base = index * CELLS
        self._connections = base + CONNECTIONS
        self._accepted = base + ACCEPTED
        # The other slots' cell offsets, scanned on every admitted connection.
        self._others = [i * CELLS for i in range(table.size) if i != index]
        self.accepted = 0
        # Peers found not accepting while connections waited: slot offset -> their
        # ``accepted`` then. Ignored until that count moves (or the slot is reused).
        self.stalled: dict[int, int] = {}
        # The worker's max_connections: once full, any peer with fewer takes the next one
        # (instead of a 503 from this worker).
        self.limit = 1 << 62

    def state(self, value: int) -> None:
        """Publish :data:`CLOSED`, :data:`LISTENING` or :data:`PAUSED`."""
        self.cells[self.base + ACCEPTING] = value

    def opened(self, connections: int) -> bool:
        """A connection was admitted and ``connections`` are open now: publish that, and
        return whether to pause accepting (more than the least loaded peer plus slack).
        When that peer is paused itself, it is woken: it is within its share again."""
        cells = self.cells
        self.accepted += 1
        cells[self._accepted] = self.accepted
        cells[self._connections] = connections
        least, base = self._least()
        if least < 0 or not self._over(connections, least):
            return False
        if cells[base + ACCEPTING] == PAUSED and not cells[base + WAKE]:
            pid = cells[base + PID]
            cells[base + WAKE] = 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, WAKE_SIGNAL)
        return True

    def _least(self) -> tuple[int, int]:
        """The least loaded live peer that is not stalled: (connections, slot offset), or
        (-1, -1) when there is none."""
        cells = self.cells
        stalled = self.stalled
        least = found = -1
        for base in self._others:
            if cells[base + ACCEPTING] != CLOSED and cells[base + PID] > 0:
                if stalled and base in stalled:
                    if stalled[base] == cells[base + ACCEPTED]:
                        continue
                    del stalled[base]  # it accepts again
                n = cells[base + CONNECTIONS]
                if least < 0 or n < least:
                    least, found = n, base
        return least, found

    def woken(self) -> None:
        """The wake signal arrived: a peer may send the next one."""
        self.cells[self.base + WAKE] = 0

    def closed(self, connections: int) -> None:
        self.cells[self._connections] = connections

    def least(self) -> int:
        """Connections of the least loaded live peer (not stalled); -1 when none."""
        return self._least()[0]

    def over_share(self, connections: int) -> bool:
        """Whether ``connections`` exceed the least loaded live peer's plus slack (or
        reach :attr:`limit` while that peer holds fewer)."""
        least = self._least()[0]
        return least >= 0 and self._over(connections, least)

    def _over(self, connections: int, least: int) -> bool:
        return connections > least + slack(least) or (
            connections >= self.limit and least < connections
        )

    def progress(self) -> dict[int, int]:
        """``accepted`` of every live peer, to see later which of them accepted meanwhile."""
        cells = self.cells
        return {
            base: cells[base + ACCEPTED]
            for base in self._others
            if cells[base + PID] > 0 and cells[base + ACCEPTING] != CLOSED
        }

    def moved(self, before: dict[int, int]) -> bool:
        """Whether any peer in ``before`` accepted a connection since."""
        cells = self.cells
        return any(cells[base + ACCEPTED] != n for base, n in before.items())

    def stall(self, before: dict[int, int]) -> None:
        """Ignore the listening peers that accepted nothing since ``before``."""
        cells = self.cells
        for base, n in before.items():
            if cells[base + ACCEPTED] == n and cells[base + ACCEPTING] != CLOSED:
                self.stalled[base] = n


def backlog(sock: socket.socket) -> int:
    """Connections waiting in a TCP listening socket's accept queue; -1 when unknown
    (not TCP, or not Linux)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "TCP_INFO"):
        return -1
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return -1
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked:
    # for a listening socket tcpi_unacked is the accept queue length.
    return int(struct.unpack_from("I", info, 24)[0]) if len(info) >= 28 else -1

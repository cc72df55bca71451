"""Closing a listening socket without resetting the connections in its accept queue.

The kernel completes TCP handshakes on a listener's behalf and queues the connections until
``accept()``. Closing the listener resets every queued one: a client that connected and sent
its request gets ``ECONNRESET`` on a fresh connection, which no client may retry. With
pre-fork workers sharing one listener this hits whichever worker closes it last, however
gracefully it stops, and a load test during SIGTERM sees it now and then.

A graceful stop therefore (1) stops new handshakes on the listener with
:func:`refuse_new_connections`, on Linux a socket filter that drops every incoming segment
(the listener is shared, so only when every holder of it is stopping; a dropped SYN is
retransmitted, then refused once the listener is gone), and (2) accepts what is queued with
:func:`accept_pending` and serves it before closing its copy.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from typing import Final

# <linux/filter.h>: SO_ATTACH_FILTER, and one classic BPF instruction, BPF_RET|BPF_K 0:
# "keep 0 bytes of this packet", i.e. drop it.
SO_ATTACH_FILTER: Final = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_ALL: Final = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Stop the kernel completing new handshakes on a TCP listener; the queue stays.

    Affects the socket itself, so every process sharing it: call it only when all of them
    are stopping.

    Returns:
        Whether the filter is in place (False off Linux, or for a non-TCP socket).
    """
    if not sys.platform.startswith("linux") or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return False
    program = ctypes.create_string_buffer(_DROP_ALL)  # the kernel copies it in setsockopt
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def accept_pending(sock: socket.socket) -> list[socket.socket]:
    """Accept every connection queued on a listener now, without waiting for more.

    Leaves the listener non-blocking (it is about to be closed); the accepted sockets are
    non-blocking too, ready for ``loop.connect_accepted_socket``.
    """
    sock.setblocking(False)
    accepted = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            break  # the queue is empty (or another worker took the rest)
        except ConnectionAbortedError:
            continue  # that one left before we took it; the next may not have
        except OSError:
            break  # out of file descriptors and the like: take no more now
        conn.setblocking(False)
        accepted.append(conn)
    return accepted


__all__ = ["accept_pending", "refuse_new_connections"]

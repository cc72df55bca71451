"""A recording transport and a scriptable core, for transport tests without sockets."""

from __future__ import annotations

from netstack.errors import RemoteProtocolError


class RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.eof_written = False
        self.closing = False
        self.aborted = False
        self.reading = True
        self.buffered = 0
        self.limits: tuple[int, int] | None = None
        self.protocol = None

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.written.append(data)

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("198.51.100.7", 4242) if name == "peername" else default


class ScriptCore:
    """Every received chunk is one event; ``b"!"`` raises; replies are queued by the test."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.outgoing: list[bytes] = []
        self.eof = False

    def receive_data(self, data: bytes) -> None:
        for part in data.split(b"|"):
            if part == b"!":
                raise RemoteProtocolError("bang")
            self.events.append(part)

    def receive_eof(self) -> None:
        self.eof = True

    def events_received(self) -> list[bytes]:
        out, self.events = self.events, []
        return out

    def data_to_send(self) -> list[bytes]:
        out, self.outgoing = self.outgoing, []
        return out

"""FramedProtocol: a StreamProtocol whose core is a framing codec (shared by echo ends)."""

from __future__ import annotations

from netstack.config import Framing, Limits, Timeouts
from netstack.proto.framing import Codec, Frame, make_codec
from netstack.transport.stream import StreamProtocol


class FramedProtocol(StreamProtocol[Frame]):
    """Drive a length-prefixed or line codec, sized from ``limits``.

    Subclasses implement :meth:`handle_event`; ``self.codec`` is the connection's codec.
    """

    codec: Codec

    def __init__(self, framing: Framing, *, limits: Limits, timeouts: Timeouts) -> None:
        super().__init__(limits=limits, timeouts=timeouts)
        self.framing = framing

    def make_core(self) -> Codec:
        self.codec = make_codec(
            self.framing,
            max_frame_bytes=self.limits.max_frame_bytes,
            max_line_bytes=self.limits.max_line_bytes,
        )
        return self.codec


__all__ = ["FramedProtocol"]

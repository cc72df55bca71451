"""Chat service: rooms, DMs and presence over WebSocket and TCP (``netstack chat serve``).

``proto/chat.py`` holds the grammar and per-session state; here are the store
(:mod:`.store`, :mod:`.sqlite`), the fan-out (:mod:`.fanout`), the session logic shared by
both transports (:mod:`.service`) and the transports (:mod:`.tcp`, :mod:`.ws`, the latter
importing ``websockets`` lazily).
"""

from netstack.servers.chat.server import ChatServer, database_location, open_store
from netstack.servers.chat.service import ChatService, Session

__all__ = ["ChatServer", "ChatService", "Session", "database_location", "open_store"]

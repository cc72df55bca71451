"""gRPC notes service (``netstack rpc serve|call``), on ``grpc.aio`` (the ``grpc`` extra).

``proto/notes.proto`` is the contract; ``_pb/`` holds its generated stubs
(``scripts/gen-proto``). Here are the store (:mod:`.store`, :mod:`.sqlite`,
:mod:`.postgres`), page tokens (:mod:`.paging`), the change fan-out (:mod:`.watch`), auth
(:mod:`.auth`), the servicer (:mod:`.service`), the server (:mod:`.server`) and the
reflection-driven client behind ``netstack rpc call`` (:mod:`.client`). Importing this
package imports ``grpc``: the CLI imports it only inside the ``rpc`` commands.
"""

from netstack.servers.rpc.server import RPCServer, database_location, open_store
from netstack.servers.rpc.service import NotesService

__all__ = ["NotesService", "RPCServer", "database_location", "open_store"]

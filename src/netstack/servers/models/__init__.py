"""The five concurrency models, all serving the same length-prefixed echo protocol.

=============  ============================================================
``blocking``   one thread, one connection at a time (:mod:`.blocking`)
``threaded``   one thread per connection (:mod:`.threaded`)
``pool``       bounded worker pool, semaphore and mutex (:mod:`.pool`)
``selectloop`` from-scratch event loop on ``selectors`` (:mod:`.selectloop`,
               :mod:`.selectserver`)
``asyncio``    ``asyncio.Protocol`` on uvloop when importable (:mod:`.aioserver`)
=============  ============================================================

Each is a :class:`ModelServer`: construct it with a listening socket and a
:class:`ModelConfig`, call ``serve(stop_event)`` in any thread. ``python -m
netstack.servers.models MODEL --bind HOST:PORT`` runs one as a process (``__main__``).
"""

from __future__ import annotations

from netstack.config import ModelName
from netstack.servers.models.aioserver import AsyncioServer
from netstack.servers.models.base import ModelConfig, ModelServer, create_listener
from netstack.servers.models.blocking import BlockingServer
from netstack.servers.models.pool import PoolServer
from netstack.servers.models.selectserver import SelectLoopServer
from netstack.servers.models.threaded import ThreadedServer

MODELS: dict[ModelName, type[ModelServer]] = {
    "blocking": BlockingServer,
    "threaded": ThreadedServer,
    "pool": PoolServer,
    "selectloop": SelectLoopServer,
    "asyncio": AsyncioServer,
}

__all__ = [
    "MODELS",
    "AsyncioServer",
    "BlockingServer",
    "ModelConfig",
    "ModelServer",
    "PoolServer",
    "SelectLoopServer",
    "ThreadedServer",
    "create_listener",
]

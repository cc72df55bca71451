"""Opening a PostgreSQL store, shared by the chat and notes services.

Both create their schema under an advisory lock (instances starting together do not race
on ``CREATE TABLE``) and then serve from a psycopg pool. One direct connection comes first:
its error says why (refused, bad password...), where a pool would only time out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, LiteralString

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

# A few connections per instance: commands are short, and a PostgreSQL backend costs MBs.
POOL_MIN: Final = 1
POOL_MAX: Final = 10
CONNECT_TIMEOUT: Final = 10  # seconds


def one_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint on the second): one line for the CLI."""
    return " ".join(str(exc).split())


async def open_pool(
    url: str,
    *,
    schema: Sequence[LiteralString],
    schema_lock: int,
    max_size: int,
    name: str,
    unavailable: type[Exception],
) -> AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]:
    """Create the schema if needed (``schema`` statements under ``schema_lock``), then
    open and return a pool of at most ``max_size`` connections.

    Raises:
        unavailable: psycopg is missing, or the server cannot be reached or refuses.
    """
    try:
        import psycopg
        from psycopg_pool import AsyncConnectionPool
    except ImportError as exc:
        raise unavailable(
            "PostgreSQL needs psycopg and psycopg_pool: pip install 'netstack[db]'"
        ) from exc
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise unavailable(f"cannot connect to PostgreSQL: {one_line(exc)}") from exc
    async with conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
        for statement in schema:
            await conn.execute(statement)
    pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
        url,
        min_size=POOL_MIN,
        max_size=max_size,
        kwargs={"connect_timeout": CONNECT_TIMEOUT},
        open=False,
        name=name,
    )
    await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
    return pool


class PooledStore:
    """The connection plumbing of a PostgreSQL store: ``open`` (schema, then pool),
    ``pool`` and ``close``. A subclass names its schema, lock, pool and error.

    Args:
        url: a ``postgresql://user:password@host:port/dbname`` conninfo URL (libpq
            parameters such as ``?options=-csearch_path%3Dchat`` pass through).
        max_connections: the pool's upper bound.
    """

    SCHEMA: ClassVar[Sequence[LiteralString]]
    SCHEMA_LOCK: ClassVar[int]
    POOL_NAME: ClassVar[str]
    UNAVAILABLE: ClassVar[type[Exception]]

    def __init__(self, url: str, *, max_connections: int = POOL_MAX) -> None:
        self.url = url
        self.max_connections = max_connections
        self._pool: AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]] | None = None

    @property
    def pool(self) -> AsyncConnectionPool[AsyncConnection[tuple[Any, ...]]]:
        assert self._pool is not None, "open() first"
        return self._pool

    async def open(self) -> None:
        """Connect, create the schema if needed, then open the pool.

        Raises:
            UNAVAILABLE: psycopg is missing, or the server cannot be reached or refuses.
        """
        self._pool = await open_pool(
            self.url,
            schema=self.SCHEMA,
            schema_lock=self.SCHEMA_LOCK,
            max_size=self.max_connections,
            name=self.POOL_NAME,
            unavailable=self.UNAVAILABLE,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

import gc
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store lives, for the tests that run on both stores."""
    if request.param == "sqlite":
        return str(tmp_path / "notes.sqlite3")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(autouse=True)
def _collect_grpc_garbage():
    """Run gRPC's finalizers here, not during a later compile().

    On CPython 3.11.7, a garbage collection that finalizes grpc.aio objects in the middle
    of an ``ast``/``compile`` call (pytest rewriting a module imported at the end of the
    session) fails with "SystemError: AST constructor recursion depth mismatch".
    """
    yield
    gc.collect()

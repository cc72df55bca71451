import gc

import pytest


@pytest.fixture(autouse=True)
def _collect_grpc_garbage():
    """Run gRPC's finalizers here, not during a later compile().

    On CPython 3.11.7, a garbage collection that finalizes grpc.aio objects in the middle
    of an ``ast``/``compile`` call (pytest rewriting a module imported at the end of the
    session) fails with "SystemError: AST constructor recursion depth mismatch".
    """
    yield
    gc.collect()

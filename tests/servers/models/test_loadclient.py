"""The benchmark's load client, in-process against in-thread servers."""

from __future__ import annotations

import socket

import pytest

from netstack.servers.models.loadclient import (
    LoadResult,
    LoadSpec,
    LoadWorkers,
    merge,
    run_load,
    split,
)
from tests.servers.models.support import running


def test_ping_pong_load_against_threaded() -> None:
    with running("threaded") as srv:
        result = run_load(LoadSpec("127.0.0.1", srv.address[1], 3, 100, 0.3, 10**6))
    assert result.connections == result.served == 3
    assert result.errors == 0
    assert result.messages == len(result.latencies) > 0
    assert result.rate > 0
    p50, p99 = result.percentiles(50, 99)
    assert p50 is not None
    assert p99 is not None
    assert 0 < p50 <= p99


def test_blocking_serves_one_and_the_rest_wait() -> None:
    with running("blocking") as srv:
        result = run_load(LoadSpec("127.0.0.1", srv.address[1], 4, 64, 0.3, 10**6))
    assert result.served == 1
    assert result.errors == 0
    assert result.messages > 0


def test_message_budget_ends_the_point_early() -> None:
    with running("selectloop") as srv:
        result = run_load(LoadSpec("127.0.0.1", srv.address[1], 2, 10, 30.0, 50))
    assert result.messages == 50
    assert result.elapsed < 30


def test_refused_connections_are_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, never listening
        port = probe.getsockname()[1]
        result = run_load(LoadSpec("127.0.0.1", port, 3, 10, 0.3, 100))
    assert result.errors == 3
    assert result.messages == result.served == 0
    assert result.percentiles(50) == [None]
    assert run_load(LoadSpec("127.0.0.1", port, 0, 10, 0.3, 100)).connections == 0


def test_server_closing_is_an_error() -> None:
    # max_frame_bytes below the message size: the server closes every connection.
    with running("asyncio", max_frame_bytes=8) as srv:
        result = run_load(LoadSpec("127.0.0.1", srv.address[1], 2, 64, 0.3, 100))
    assert result.errors == 2
    assert result.messages == 0


def test_split_and_merge() -> None:
    assert split(5, 2) == [3, 2]
    assert split(1, 4) == [1]
    a = LoadResult(connections=2, served=2, messages=3, errors=0, elapsed=1.0)
    a.latencies.extend([0.1, 0.2, 0.3])
    b = LoadResult(connections=1, served=0, messages=0, errors=1, elapsed=1.5)
    total = merge([a, b])
    assert (total.connections, total.served, total.messages, total.errors) == (3, 2, 3, 1)
    assert total.elapsed == 1.5
    assert total.rate == 2.0
    assert total.percentiles(0, 50, 100) == [0.1, 0.2, 0.3]
    assert LoadResult().rate == 0.0


def test_workers_run_shares_in_separate_processes() -> None:
    with running("asyncio") as srv, LoadWorkers(2) as workers:
        assert workers.processes == 2
        workers.start([LoadSpec("127.0.0.1", srv.address[1], 1, 32, 0.2, 10**6)] * 2)
        results = _wait_all(workers)
        assert [r.served for r in results] == [1, 1]
        with pytest.raises(ValueError, match="3 shares for 2 processes"):
            workers.start([LoadSpec("127.0.0.1", 1, 1, 1, 0.1, 1)] * 3)


def test_worker_failure_is_reported() -> None:
    with LoadWorkers(1) as workers:
        workers.start([LoadSpec("no-such-host.invalid", 1, 1, 1, 0.1, 1)])
        with pytest.raises(RuntimeError, match="load process 0 failed"):
            _wait_all(workers)


def _wait_all(workers: LoadWorkers) -> list[LoadResult]:
    while (results := workers.wait(0.1)) is None:
        pass
    return results

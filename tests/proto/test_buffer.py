from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netstack.proto.buffer import ReceiveBuffer
from tests.helpers import splits


def test_read_exact_waits_for_enough_bytes() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"abc")
    assert buf.read_exact(4) is None
    assert len(buf) == 3
    buf.feed(b"de")
    assert buf.read_exact(4) == b"abcd"
    assert bytes(buf) == b"e"
    assert buf


def test_empty_buffer_is_falsy() -> None:
    buf = ReceiveBuffer()
    assert not buf
    assert len(buf) == 0
    assert buf.read_exact(0) == b""


def test_read_until_finds_delimiter_split_across_feeds() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"hello\r")
    assert buf.read_until(b"\r\n") is None
    buf.feed(b"\nworld")
    assert buf.read_until(b"\r\n") == b"hello\r\n"
    assert buf.read_until(b"\r\n") is None
    assert buf.peek(3) == b"wor"


def test_search_resumes_instead_of_rescanning() -> None:
    buf = ReceiveBuffer()
    for _ in range(100):
        buf.feed(b"x")
        assert buf.read_until(b"\n") is None
    # The search position advanced with the data: the next search starts near the end.
    assert buf._search_from == 100
    buf.feed(b"\n")
    assert buf.read_until(b"\n") == b"x" * 100 + b"\n"
    assert not buf


def test_consumed_prefix_is_compacted() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"a" * 10)
    assert buf.read_exact(2) == b"aa"
    assert buf._start == 2  # small prefix: not moved yet
    assert buf.read_exact(4) == b"aaaa"
    assert buf._start == 0  # more than half consumed: compacted
    assert bytes(buf) == b"aaaa"


@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_read_until_matches_split_whatever_the_feed(data: bytes, seed: int) -> None:
    expected = [part + b"\n" for part in data.split(b"\n")[:-1]]
    for chunks in splits(data, seed):
        buf = ReceiveBuffer()
        got: list[bytes] = []
        for chunk in chunks:
            buf.feed(chunk)
            while (line := buf.read_until(b"\n")) is not None:
                got.append(line)
        assert got == expected
        assert bytes(buf) == data.split(b"\n")[-1]

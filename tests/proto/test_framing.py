from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netstack.errors import LimitExceeded, LocalProtocolError, ProtocolError, RemoteProtocolError
from netstack.proto.framing import (
    Codec,
    Frame,
    LengthPrefixedCodec,
    LineCodec,
    State,
    decode_datagram,
    encode_datagram,
    make_codec,
)
from tests.helpers import splits


def feed(codec: Codec, chunks: list[bytes]) -> list[Frame]:
    events: list[Frame] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        events.extend(codec.events_received())
    return events


# ---------------------------------------------------------------- length-prefixed


def test_length_frames_decode() -> None:
    codec = LengthPrefixedCodec()
    codec.receive_data(b"\x00\x00\x00\x03abc\x00\x00\x00\x00\x00\x00")
    assert codec.events_received() == [b"abc", b""]
    assert codec.buffered == 2
    assert codec.events_received() == []


def test_length_header_over_limit_refused_before_body() -> None:
    codec = LengthPrefixedCodec(max_frame_bytes=10)
    with pytest.raises(LimitExceeded) as info:
        codec.receive_data(struct.pack("!I", 11))  # header only: no body buffered
    assert info.value.limit == "max_frame_bytes"
    assert info.value.value == 10
    assert info.value.actual == 11
    assert info.value.status_hint == 413
    assert "max_frame_bytes" in str(info.value)
    assert codec.state is State.ERROR


def test_frames_before_an_error_are_kept() -> None:
    codec = LengthPrefixedCodec(max_frame_bytes=4)
    with pytest.raises(LimitExceeded):
        codec.receive_data(b"\x00\x00\x00\x02ok" + struct.pack("!I", 5))
    assert codec.events_received() == [b"ok"]


def test_length_frame_at_limit_is_accepted() -> None:
    codec = LengthPrefixedCodec(max_frame_bytes=4)
    codec.receive_data(codec.encode(b"1234"))
    assert codec.events_received() == [b"1234"]


def test_encode_over_limit_is_a_local_error() -> None:
    codec = LengthPrefixedCodec(max_frame_bytes=2)
    with pytest.raises(LocalProtocolError):
        codec.encode(b"abc")
    with pytest.raises(LocalProtocolError):
        codec.send(b"abc")  # send() inlines encode() on its fast path
    assert codec.state is State.OPEN


def test_send_and_data_to_send() -> None:
    codec = LengthPrefixedCodec()
    codec.send(b"hi")
    codec.send(b"")
    assert codec.data_to_send() == [b"\x00\x00\x00\x02hi", b"\x00\x00\x00\x00"]
    assert codec.data_to_send() == []


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 70_000])
def test_send_matches_encode_on_both_sides_of_the_small_header_table(size: int) -> None:
    codec = LengthPrefixedCodec()
    payload = bytes(size)
    codec.send(payload)
    assert codec.data_to_send() == [struct.pack("!I", size) + payload]
    assert codec.encode(payload) == struct.pack("!I", size) + payload


def test_clean_eof_closes() -> None:
    codec = LengthPrefixedCodec()
    codec.receive_data(b"\x00\x00\x00\x01x")
    codec.receive_eof()
    assert codec.state is State.CLOSED
    assert codec.events_received() == [b"x"]


def test_eof_inside_frame_is_remote_error() -> None:
    codec = LengthPrefixedCodec()
    codec.receive_data(b"\x00\x00\x00\x05ab")
    with pytest.raises(RemoteProtocolError, match=r"inside a frame \(6 bytes pending\)"):
        codec.receive_eof()
    assert codec.state is State.ERROR


@pytest.mark.parametrize("call", ["receive_data", "receive_eof"])
def test_use_after_close_is_local_error(call: str) -> None:
    codec = LengthPrefixedCodec()
    codec.receive_eof()
    method = getattr(codec, call)
    args = (b"x",) if call == "receive_data" else ()
    with pytest.raises(LocalProtocolError, match="closed"):
        method(*args)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        LengthPrefixedCodec(0)
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineCodec(-1)


# ---------------------------------------------------------------- lines


def test_lines_lf_and_crlf() -> None:
    codec = LineCodec(max_line_bytes=100)
    codec.receive_data(b"one\ntwo\r\nthree\r")
    assert codec.events_received() == [b"one", b"two"]
    codec.receive_data(b"\n")
    assert codec.events_received() == [b"three"]


def test_bare_cr_inside_a_line_is_content() -> None:
    codec = LineCodec(max_line_bytes=100)
    codec.receive_data(b"a\rb\n")
    assert codec.events_received() == [b"a\rb"]


def test_line_exactly_at_limit_with_crlf_split() -> None:
    codec = LineCodec(max_line_bytes=3)
    codec.receive_data(b"abc\r")  # 4 bytes pending, last is '\r': still acceptable
    codec.receive_data(b"\n")
    assert codec.events_received() == [b"abc"]


def test_unterminated_line_over_limit_refused_early() -> None:
    codec = LineCodec(max_line_bytes=3)
    with pytest.raises(LimitExceeded) as info:
        codec.receive_data(b"abcd")  # no terminator and already too long
    assert info.value.limit == "max_line_bytes"


def test_unterminated_line_far_over_limit_refused() -> None:
    codec = LineCodec(max_line_bytes=3)
    with pytest.raises(LimitExceeded):
        codec.receive_data(b"abcde\r")


def test_terminated_line_over_limit_refused() -> None:
    codec = LineCodec(max_line_bytes=3)
    with pytest.raises(LimitExceeded) as info:
        codec.receive_data(b"abcd\n")
    assert info.value.actual == 4


def test_cr_then_other_byte_over_limit() -> None:
    codec = LineCodec(max_line_bytes=3)
    codec.receive_data(b"abc\r")
    with pytest.raises(LimitExceeded):
        codec.receive_data(b"x\n")


def test_line_encode_rules() -> None:
    codec = LineCodec(max_line_bytes=3)
    assert codec.encode(b"abc") == b"abc\n"
    with pytest.raises(LocalProtocolError, match="newline"):
        codec.encode(b"a\nb")
    with pytest.raises(LocalProtocolError, match="max_line_bytes"):
        codec.encode(b"abcd")


def test_make_codec() -> None:
    length = make_codec("length", max_frame_bytes=7, max_line_bytes=9)
    line = make_codec("line", max_frame_bytes=7, max_line_bytes=9)
    assert isinstance(length, LengthPrefixedCodec)
    assert length.limit == 7
    assert isinstance(line, LineCodec)
    assert line.limit == 9


# ---------------------------------------------------------------- datagrams


def test_datagram_roundtrip() -> None:
    data = encode_datagram(7, b"hello", max_datagram_bytes=100)
    assert decode_datagram(data, max_datagram_bytes=100) == (7, b"hello")


def test_datagram_limits() -> None:
    with pytest.raises(LocalProtocolError, match="max_datagram_bytes"):
        encode_datagram(1, b"x" * 10, max_datagram_bytes=13)
    with pytest.raises(LocalProtocolError, match="32 bits"):
        encode_datagram(2**32, b"", max_datagram_bytes=100)
    with pytest.raises(LocalProtocolError, match="32 bits"):
        encode_datagram(-1, b"", max_datagram_bytes=100)
    with pytest.raises(LimitExceeded):
        decode_datagram(b"x" * 20, max_datagram_bytes=19)
    with pytest.raises(RemoteProtocolError, match="no request id"):
        decode_datagram(b"abc", max_datagram_bytes=19)


# ---------------------------------------------------------------- properties

payloads = st.lists(st.binary(max_size=300), max_size=20)


@given(payloads, st.integers(0, 2**32 - 1))
def test_length_encode_decode_identity_any_split(messages: list[bytes], seed: int) -> None:
    encoder = LengthPrefixedCodec()
    wire = b"".join(encoder.encode(m) for m in messages)
    for chunks in splits(wire, seed):
        assert feed(LengthPrefixedCodec(), chunks) == messages


@given(
    st.lists(st.binary(max_size=80).filter(lambda b: b"\n" not in b and not b.endswith(b"\r"))),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_line_encode_decode_identity_any_split(
    messages: list[bytes], crlf: bool, seed: int
) -> None:
    codec = LineCodec(max_line_bytes=100)
    wire = b"".join(codec.encode(m)[:-1] + b"\r\n" if crlf else codec.encode(m) for m in messages)
    for chunks in splits(wire, seed):
        assert feed(LineCodec(max_line_bytes=100), chunks) == messages


@given(st.binary(max_size=400), st.integers(0, 2**32 - 1), st.sampled_from(["length", "line"]))
def test_arbitrary_bytes_same_outcome_any_split(data: bytes, seed: int, framing: str) -> None:
    """Events and error (if any) do not depend on how the input is split."""

    def run(chunks: list[bytes]) -> tuple[list[Frame], str | None]:
        codec = make_codec(framing, max_frame_bytes=64, max_line_bytes=16)  # type: ignore[arg-type]
        events: list[Frame] = []
        try:
            for chunk in chunks:
                codec.receive_data(chunk)
                events.extend(codec.events_received())
        except LimitExceeded as exc:
            events.extend(codec.events_received())
            assert codec.state is State.ERROR
            return events, exc.limit
        return events, None

    outcomes = [run(chunks) for chunks in splits(data, seed)]
    # Where an error happens, the frames before it must not depend on the split; a
    # one-byte-at-a-time feed may detect an over-long unterminated line at the same point.
    assert all(o == outcomes[0] for o in outcomes)


class CodecMachine(RuleBasedStateMachine):
    """Any sequence of inputs leaves the codec in a valid state or raises ProtocolError."""

    def __init__(self) -> None:
        super().__init__()
        self.codec: Codec = LengthPrefixedCodec(max_frame_bytes=32)

    @rule(framing=st.sampled_from(["length", "line"]))
    def reset(self, framing: str) -> None:
        self.codec = make_codec(framing, max_frame_bytes=32, max_line_bytes=32)  # type: ignore[arg-type]

    @rule(data=st.binary(max_size=64))
    def data(self, data: bytes) -> None:
        before = self.codec.state
        try:
            self.codec.receive_data(data)
        except LocalProtocolError:
            assert before is not State.OPEN
        except RemoteProtocolError:
            assert self.codec.state is State.ERROR
        else:
            assert self.codec.state is State.OPEN

    @rule()
    def eof(self) -> None:
        try:
            self.codec.receive_eof()
        except ProtocolError:
            assert self.codec.state is not State.OPEN
        else:
            assert self.codec.state is State.CLOSED

    @precondition(lambda self: self.codec.state is State.OPEN)
    @rule(payload=st.binary(max_size=40))
    def send(self, payload: bytes) -> None:
        try:
            self.codec.send(payload)
        except LocalProtocolError:
            assert len(payload) > self.codec.limit or b"\n" in payload
        self.codec.data_to_send()

    @invariant()
    def state_is_valid(self) -> None:
        assert self.codec.state in set(State)
        self.codec.events_received()


TestCodecMachine = CodecMachine.TestCase
TestCodecMachine.settings = settings(max_examples=50, stateful_step_count=20)


def test_eof_after_header_only_is_remote_error() -> None:
    codec = LengthPrefixedCodec()
    codec.receive_data(b"\x00\x00\x00\x05")
    with pytest.raises(RemoteProtocolError):
        codec.receive_eof()

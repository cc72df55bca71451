"""log.write_info_line: the direct text path prints exactly what logging would, and only
when nothing else could see the record."""

from __future__ import annotations

import io
import logging
import re

import pytest

from netstack import log

NAME = "netstack.lb.access"
STAMP = re.compile(r"\d\d:\d\d:\d\d ")


@pytest.fixture
def stream() -> io.StringIO:
    """netstack's logging as the CLI configures it, writing to a StringIO."""
    log.configure("info")
    out = io.StringIO()
    handler = logging.getLogger("netstack").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    return out


def cli_handlers_only() -> None:
    """Drop pytest's capture handlers, added to the netstack logger for each test phase:
    they would see the record, so the direct path rightly refuses while they are there."""
    netstack = logging.getLogger("netstack")
    netstack.handlers[:] = [h for h in netstack.handlers if type(h) is logging.StreamHandler]


def both_ways(out: io.StringIO, message: str) -> tuple[str, str]:
    """The line written directly, then the one logging writes (stamps blanked)."""
    cli_handlers_only()
    assert log.write_info_line(logging.getLogger(NAME), message)
    direct = out.getvalue()
    out.seek(0)
    out.truncate()
    logging.getLogger(NAME).info(message)
    return STAMP.sub("HH ", direct), STAMP.sub("HH ", out.getvalue())


def test_the_direct_line_is_the_logged_line(stream: io.StringIO) -> None:
    direct, logged = both_ways(stream, 'a "quoted" 100% line')
    assert direct == logged == f'HH INFO    {NAME}: a "quoted" 100% line\n'


def test_the_prefix_of_netstack_up_is_kept(stream: io.StringIO) -> None:
    log.prefix_text_lines("up       | ")
    direct, logged = both_ways(stream, "x")
    assert direct == logged == f"up       | HH INFO    {NAME}: x\n"


def test_the_stamp_is_the_local_time_of_the_line(stream: io.StringIO) -> None:
    formatter = log.TextFormatter()
    assert formatter.stamp(0.0) == formatter.formatTime(logging.makeLogRecord({"created": 0.0}))
    assert formatter.stamp(59.9) != formatter.stamp(60.0)  # a new second, a new stamp


def refuse_json() -> None:
    log.configure("info", "json")


def refuse_capture() -> None:
    logging.getLogger("netstack").propagate = True  # what caplog relies on


def refuse_own_handler() -> None:
    logging.getLogger(NAME).addHandler(logging.NullHandler())


def refuse_filter() -> None:
    logging.getLogger(NAME).addFilter(lambda record: True)


def refuse_quiet_handler() -> None:
    logging.getLogger("netstack").handlers[0].setLevel(logging.WARNING)


def refuse_level() -> None:
    logging.getLogger(NAME).setLevel(logging.WARNING)


def refuse_second_handler() -> None:
    logging.getLogger("netstack").addHandler(logging.NullHandler())


@pytest.mark.parametrize(
    "setup",
    [
        refuse_json,
        refuse_capture,
        refuse_own_handler,
        refuse_filter,
        refuse_quiet_handler,
        refuse_level,
        refuse_second_handler,
    ],
)
def test_anything_else_that_could_see_the_record_takes_the_logging_path(
    stream: io.StringIO, setup: object
) -> None:
    logger = logging.getLogger(NAME)
    saved = (list(logger.handlers), list(logger.filters), logger.level)
    cli_handlers_only()
    assert log.write_info_line(logger, "")  # the direct path is open before the setup
    stream.seek(0)
    stream.truncate()
    try:
        setup()  # type: ignore[operator]
        assert not log.write_info_line(logger, "x")
    finally:
        logger.handlers[:], logger.filters[:] = saved[:2]
        logger.setLevel(saved[2])
    assert stream.getvalue() == ""


def test_a_broken_stream_leaves_the_line_to_logging(stream: io.StringIO) -> None:
    cli_handlers_only()
    stream.close()
    assert not log.write_info_line(logging.getLogger(NAME), "x")

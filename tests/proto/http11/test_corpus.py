"""The request corpus (tests/data/http11), through both parsers, fed three ways.

Each case is fed whole, one byte at a time and in random splits (tests/helpers
``splits``), through httptools and h11; both must give the events the case lists (valid
cases) or fail with its status (invalid cases). h11 is the reference; the places where
the two still legitimately differ are in test_parsers.py, not here.
"""

from __future__ import annotations

import pytest

from tests.helpers import splits
from tests.proto.http11.corpus import PARSERS, Case, load, run

VALID = load("valid")
INVALID = load("invalid")


def test_corpus_is_there() -> None:
    assert len(VALID) >= 25
    assert len(INVALID) >= 60
    for case in VALID:
        assert case.events, case.name
        assert case.status is None, case.name
    for case in INVALID:
        assert case.status is not None, case.name
        assert not case.events, case.name


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("case", VALID, ids=[c.name for c in VALID])
def test_valid(case: Case, parser: str) -> None:
    for n, chunks in enumerate(splits(case.raw, seed=int(case.name[-3:]))):
        events, status = run(case, parser, chunks)
        assert status is None, f"{case.description} (split #{n})"
        assert events == case.events, f"{case.description} (split #{n})"


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("case", INVALID, ids=[c.name for c in INVALID])
def test_invalid(case: Case, parser: str) -> None:
    for n, chunks in enumerate(splits(case.raw, seed=int(case.name[-3:]))):
        _, status = run(case, parser, chunks)
        assert status == case.status, f"{case.description} (split #{n})"

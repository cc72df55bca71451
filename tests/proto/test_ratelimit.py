"""Token buckets: burst, refill, pruning and the key bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.proto.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    rl = RateLimiter(rate=2.0, burst=3)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.retry_after("a") == pytest.approx(0.5)
    assert not rl.allow("a", 0.25)  # half a token
    assert rl.allow("a", 0.5)  # one token after 0.5 s at 2/s
    assert not rl.allow("a", 0.5)
    assert rl.allow("b", 0.5)  # keys are independent
    assert rl.retry_after("b") == 0.0
    assert rl.retry_after("unknown") == 0.0


def test_refill_is_capped_at_burst() -> None:
    rl = RateLimiter(rate=100.0, burst=2)
    rl.allow("a", 0.0)
    assert [rl.allow("a", 1000.0) for _ in range(3)] == [True, True, False]


def test_prune_drops_full_buckets_only() -> None:
    rl = RateLimiter(rate=1.0, burst=2)
    rl.allow("a", 0.0)
    rl.allow("b", 0.0)
    rl.allow("b", 0.0)
    rl.prune(1.0)  # a is full again (1 + 1), b has 1 token
    assert len(rl) == 1
    assert not rl.allow("b", 1.0) or rl.retry_after("b") >= 0  # b kept its state
    assert rl.allow("a", 1.0)


def test_max_keys_prunes_then_evicts_oldest() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_keys=2)
    assert rl.allow("a", 0.0)
    assert rl.allow("b", 0.0)
    assert rl.allow("c", 0.0)  # none full: the oldest (a) goes
    assert len(rl) == 2
    assert rl.allow("a", 0.0)  # a starts afresh
    assert not rl.allow("c", 0.0)
    assert rl.allow("d", 5.0)  # everyone refilled: pruned instead
    assert len(rl) == 1


@pytest.mark.parametrize(("rate", "burst", "keys"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bad_arguments(rate, burst, keys) -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate, burst, keys)


@given(st.lists(st.floats(min_value=0, max_value=0.5), max_size=50))
def test_never_more_than_burst_plus_rate_times_elapsed(gaps) -> None:
    rl = RateLimiter(rate=4.0, burst=3)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += rl.allow("k", now)
    assert allowed <= 3 + 4.0 * now + 1e-9

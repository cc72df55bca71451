"""proto/balance.py: algorithms, bounded loads, health state machine (no loop, no sockets)."""

from __future__ import annotations

import collections
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netstack.config import ALGORITHMS, BackendConfig, HealthConfig
from netstack.errors import ConfigError, NoBackendAvailable
from netstack.proto.balance import (
    SLOW_START_FLOOR,
    Admin,
    Backend,
    BackendEvent,
    Pool,
    State,
    hash_key,
    make_pool,
)


def backends(*weights: int) -> list[Backend]:
    return [Backend(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)]


def names(picks: list[Backend]) -> str:
    return " ".join(b.name for b in picks)


def pick_n(pool: Pool, n: int, now: float = 0.0, release: bool = True, **kw) -> list[Backend]:
    out = []
    for _ in range(n):
        b = pool.acquire(now, **kw)
        if release:
            pool.release(b)
        out.append(b)
    return out


class FixedRandom:
    """A scripted random source: randrange returns the queued values."""

    def __init__(self, ranges: list[int], floats: list[float] | None = None) -> None:
        self.ranges = collections.deque(ranges)
        self.floats = collections.deque(floats or [])

    def randrange(self, stop: int, /) -> int:
        value = self.ranges.popleft()
        assert 0 <= value < stop
        return value

    def random(self) -> float:
        return self.floats.popleft()


# ---------------------------------------------------------------- construction


def test_pool_needs_backends_with_unique_names() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Pool("p", [])
    with pytest.raises(ValueError, match="unique"):
        Pool("p", [Backend("a", "h", 1), Backend("a", "h", 2)])
    with pytest.raises(ValueError, match="unknown algorithm"):
        Pool("p", backends(1), algorithm="fastest")  # type: ignore[arg-type]


def test_make_pool_from_config() -> None:
    pool = make_pool(
        "web",
        [BackendConfig(address="[::1]:9001", weight=3), BackendConfig(address="10.0.0.1:80")],
        algorithm="least_connections",
    )
    first, second = pool.backends
    assert (first.name, first.host, first.port, first.weight) == ("[::1]:9001", "::1", 9001, 3)
    assert (second.host, second.port, second.weight) == ("10.0.0.1", 80, 1)
    assert pool.algorithm == "least_connections"
    assert repr(first) == "<Backend [::1]:9001 up active=0>"


def test_hash_key_is_stable_and_64_bit() -> None:
    # blake2b, not hash(): the same key must land on the same backend after a restart.
    assert hash_key("10.0.0.1") == int.from_bytes(
        __import__("hashlib").blake2b(b"10.0.0.1", digest_size=8).digest(), "big"
    )
    assert 0 <= hash_key("x") < 2**64
    assert hash_key("a") != hash_key("b")


# ---------------------------------------------------------------- algorithms


def test_round_robin_cycles_and_ignores_weights() -> None:
    pool = Pool("p", backends(5, 1, 1))
    assert names(pick_n(pool, 6)) == "b0 b1 b2 b0 b1 b2"


def test_smooth_weighted_round_robin_matches_nginx() -> None:
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    pool = Pool("p", backends(5, 1, 1), algorithm="weighted_round_robin")
    assert names(pick_n(pool, 7)) == "b0 b0 b1 b0 b2 b0 b0"
    assert names(pick_n(pool, 7)) == "b0 b0 b1 b0 b2 b0 b0"


@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(1, 3))
def test_smooth_weighted_gives_exact_shares(weights: list[int], rounds: int) -> None:
    pool = Pool("p", backends(*weights), algorithm="weighted_round_robin")
    counts = collections.Counter(b.name for b in pick_n(pool, sum(weights) * rounds))
    assert counts == {f"b{i}": w * rounds for i, w in enumerate(weights)}


def test_least_connections_prefers_idle_and_respects_weight() -> None:
    pool = Pool("p", backends(1, 1, 2), algorithm="least_connections")
    held = pick_n(pool, 4, release=False)
    # (active + 1) / weight: b2 has twice the weight, so it takes two of the four.
    assert collections.Counter(b.name for b in held) == {"b0": 1, "b1": 1, "b2": 2}
    pool.release(held[0])
    assert pool.acquire(0.0) is held[0]


def test_least_connections_breaks_ties_in_turn() -> None:
    pool = Pool("p", backends(1, 1, 1), algorithm="least_connections")
    assert names(pick_n(pool, 3)) == "b0 b1 b2"


def test_power_of_two_takes_the_less_loaded_of_two_distinct() -> None:
    # draws (1, 1): first b1, second index 1 of the others = b2.
    rng = FixedRandom([1, 1, 0, 0])
    pool = Pool("p", backends(1, 1, 1), algorithm="power_of_two", rng=rng)
    pool.backends[1].active = 3
    assert pool.acquire(0.0).name == "b2"  # b1 (3) vs b2 (0)
    assert pool.acquire(0.0).name == "b0"  # b0 (0) vs b1 (3): first wins ties and low load
    assert not rng.ranges


def test_power_of_two_tie_keeps_the_first_draw() -> None:
    rng = FixedRandom([2, 0])
    pool = Pool("p", backends(1, 1, 1), algorithm="power_of_two", rng=rng)
    assert pool.acquire(0.0).name == "b2"


def test_power_of_two_single_backend_needs_no_randomness() -> None:
    pool = Pool("p", backends(1), algorithm="power_of_two", rng=FixedRandom([]))
    assert pool.acquire(0.0).name == "b0"


@given(st.lists(st.integers(0, 10), min_size=2, max_size=8), st.integers(0, 2**32))
def test_power_of_two_never_picks_the_most_loaded_of_many(loads: list[int], seed: int) -> None:
    pool = Pool("p", backends(*[1] * len(loads)), algorithm="power_of_two", rng=random.Random(seed))
    for b, load in zip(pool.backends, loads, strict=True):
        b.active = load
    chosen = pool.acquire(0.0)
    # Two distinct draws: the unique strict maximum can never win.
    top = max(loads)
    if loads.count(top) == 1:
        assert chosen.active - 1 != top


def test_random_is_weighted() -> None:
    rng = FixedRandom([], floats=[0.0, 0.5, 0.74, 0.76, 0.999999])
    pool = Pool("p", backends(3, 1), algorithm="random", rng=rng)
    assert names(pick_n(pool, 5)) == "b0 b0 b0 b1 b1"


def test_random_float_rounding_falls_back_to_the_last() -> None:
    rng = FixedRandom([], floats=[1.0])  # outside [0, 1): the sliver past the last weight
    pool = Pool("p", backends(1, 1), algorithm="random", rng=rng)
    assert pool.acquire(0.0).name == "b1"


def test_random_default_source_spreads() -> None:
    pool = Pool("p", backends(1, 1), algorithm="random")
    counts = collections.Counter(b.name for b in pick_n(pool, 400))
    assert set(counts) == {"b0", "b1"}


# ---------------------------------------------------------------- consistent hashing


def test_consistent_hash_needs_a_key() -> None:
    pool = Pool("p", backends(1, 1), algorithm="consistent_hash")
    with pytest.raises(ValueError, match="needs a key"):
        pool.acquire(0.0)


def test_consistent_hash_is_sticky_and_spread() -> None:
    pool = Pool("p", backends(1, 1, 1, 1), algorithm="consistent_hash")
    keys = [f"10.0.{i // 256}.{i % 256}" for i in range(2000)]
    first = {k: pick_n(pool, 1, key=k)[0] for k in keys}
    again = {k: pick_n(pool, 1, key=k)[0] for k in keys}
    assert first == again
    counts = collections.Counter(b.name for b in again.values())
    assert min(counts.values()) > 2000 / 4 * 0.7  # within 30 % of the mean with 100 vnodes


@given(st.integers(0, 3))
@settings(max_examples=4)
def test_consistent_hash_moves_only_the_lost_backends_keys(lost: int) -> None:
    pool = Pool("p", backends(1, 1, 1, 1), algorithm="consistent_hash")
    keys = [f"client-{i}" for i in range(500)]
    before = {k: pick_n(pool, 1, key=k)[0] for k in keys}
    pool.set_admin(pool.backends[lost], Admin.DISABLED, 0.0)
    after = {k: pick_n(pool, 1, key=k)[0] for k in keys}
    moved = {k for k in keys if before[k] is not after[k]}
    assert moved == {k for k in keys if before[k].name == f"b{lost}"}
    assert all(b.name != f"b{lost}" for b in after.values())


@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=60),
    st.integers(1, 5),
    st.sampled_from([1.1, 1.25, 2.0]),
)
def test_bounded_loads_never_exceed_the_cap(keys: list[str], n: int, c: float) -> None:
    pool = Pool("p", backends(*[1] * n), algorithm="consistent_hash", hash_balance=c)
    for k in keys:
        chosen = pool.acquire(0.0, key=k)
        total = sum(b.active for b in pool.backends)
        # The chosen backend was under ceil(c * total / n) before this connection.
        assert chosen.active <= math.ceil(c * total / n)


def test_bounded_loads_spill_a_hot_key_to_the_next_backend() -> None:
    pool = Pool("p", backends(1, 1, 1), algorithm="consistent_hash", hash_balance=1.25)
    held = [pool.acquire(0.0, key="hot") for _ in range(9)]
    counts = collections.Counter(b.name for b in held)
    assert max(counts.values()) <= math.ceil(1.25 * 9 / 3)
    assert len(counts) == 3


def test_bounded_loads_cap_counts_excluded_backends() -> None:
    pool = Pool("p", backends(1, 1, 1), algorithm="consistent_hash", hash_balance=1.25)
    b0, b1, b2 = pool.backends
    b1.active, b2.active = 10, 4
    # cap = ceil(1.25 * (14 + 1) / 3) = 7: b1 is over it, b2 under.
    assert pool.acquire(0.0, key="k", exclude={b0}) is b2


def test_bounded_loads_fallback_to_least_loaded_when_all_allowed_are_full() -> None:
    pool = Pool("p", backends(1, 1, 1), algorithm="consistent_hash", hash_balance=1.25)
    b0, b1, b2 = pool.backends
    b1.active, b2.active = 10, 11
    # cap = ceil(1.25 * 22 / 3) = 10: both allowed ones are full, b0 (spare) was tried.
    assert pool.acquire(0.0, key="k", exclude={b0}) is b1


def test_bounded_loads_skip_ineligible_ring_nodes() -> None:
    pool = Pool("p", backends(1, 1), algorithm="consistent_hash")
    pool.set_admin(pool.backends[0], Admin.DISABLED, 0.0)
    assert {pool.acquire(0.0, key=f"k{i}").name for i in range(20)} == {"b1"}


# ---------------------------------------------------------------- eligibility


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_backend_available_names_each_state(algorithm) -> None:
    pool = Pool("web", backends(1, 1, 1), algorithm=algorithm)
    b0, b1, b2 = pool.backends
    pool.set_admin(b0, Admin.DRAINING, 0.0)
    pool.set_admin(b1, Admin.DISABLED, 0.0)
    for _ in range(pool.health.fall):
        pool.report_check(b2, False, 0.0)
    with pytest.raises(NoBackendAvailable) as info:
        pool.acquire(0.0, key="k")
    assert str(info.value) == "pool 'web': no backend available (b0 draining, b1 disabled, b2 down)"
    assert pool.eligible == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exclude_skips_tried_backends(algorithm) -> None:
    pool = Pool("p", backends(1, 1, 1), algorithm=algorithm)
    tried: set[Backend] = set()
    for _ in range(3):
        b = pool.acquire(0.0, key="k", exclude=tried)
        assert b not in tried
        tried.add(b)
    with pytest.raises(NoBackendAvailable):
        pool.acquire(0.0, key="k", exclude=tried)


def test_acquire_release_count() -> None:
    pool = Pool("p", backends(1))
    b = pool.acquire(0.0)
    assert (b.active, b.total) == (1, 1)
    pool.release(b)
    assert (b.active, b.total) == (0, 1)


# ---------------------------------------------------------------- health


def events(pool: Pool) -> list[tuple[str, str, str]]:
    return [(e.backend, e.old, e.new) for e in pool.events_received()]


def test_active_checks_rise_and_fall() -> None:
    pool = Pool("p", backends(1, 1), health=HealthConfig(rise=2, fall=3))
    b0 = pool.backends[0]
    pool.report_check(b0, False, 1.0)
    pool.report_check(b0, False, 2.0)
    pool.report_check(b0, True, 3.0)  # a pass resets the fall count
    pool.report_check(b0, False, 4.0)
    pool.report_check(b0, False, 5.0)
    assert b0.state is State.UP
    assert events(pool) == []
    pool.report_check(b0, False, 6.0)
    assert b0.state is State.DOWN
    [event] = pool.events_received()
    assert event == BackendEvent("p", "b0", "up", "down", "3 checks failed", 6.0)
    pool.report_check(b0, False, 7.0)  # already down: no new event
    pool.report_check(b0, True, 8.0)
    pool.report_check(b0, False, 9.0)  # a failure resets the rise count
    pool.report_check(b0, True, 10.0)
    assert b0.state is State.DOWN
    assert names(pick_n(pool, 3, now=10.0)) == "b1 b1 b1"
    pool.report_check(b0, True, 11.0)
    assert b0.state is State.UP
    assert events(pool) == [("b0", "down", "up")]
    assert {b.name for b in pick_n(pool, 2, now=11.0)} == {"b0", "b1"}


def test_passive_ejection_with_exponential_backoff() -> None:
    health = HealthConfig(max_fails=2, ejection_time=10.0, max_ejection_time=25.0)
    pool = Pool("p", backends(1, 1), health=health)
    b0 = pool.backends[0]
    pool.report_failure(b0, 0.0)
    pool.report_success(b0)  # a success resets the consecutive count
    pool.report_failure(b0, 0.0)
    assert b0.state is State.UP
    pool.report_failure(b0, 1.0, reason="connect error")
    assert (b0.state, b0.ejected_until, b0.ejections) == (State.EJECTED, 11.0, 1)
    [event] = pool.events_received()
    assert event.reason == "2 consecutive failures, last: connect error; out 10s"
    assert pool.next_wakeup == 11.0
    pool.report_failure(b0, 2.0)  # while ejected: counted, no state change
    assert b0.failures == 4
    assert names(pick_n(pool, 2, now=10.9)) == "b1 b1"
    pick_n(pool, 1, now=11.0)  # the pick advances time: b0 returns
    assert b0.state is State.UP
    assert events(pool) == [("b0", "ejected", "up")]
    # Failing again soon after returning doubles the period ...
    pool.report_failure(b0, 12.0)
    pool.report_failure(b0, 12.0)
    assert b0.ejected_until == 32.0
    pool.advance(32.0)
    pool.report_failure(b0, 33.0)
    pool.report_failure(b0, 33.0)
    assert b0.ejected_until == 33.0 + 25.0  # ... up to max_ejection_time
    pool.advance(58.0)
    # In service at least as long as the last ejection: the backoff starts over.
    pool.report_failure(b0, 58.0 + 25.0)
    pool.report_failure(b0, 58.0 + 25.0)
    assert b0.ejected_until == 83.0 + 10.0
    assert pool.next_wakeup == 93.0


def test_failing_checks_turn_an_ejection_into_down() -> None:
    pool = Pool("p", backends(1), health=HealthConfig(max_fails=1, fall=1, rise=1))
    b0 = pool.backends[0]
    pool.report_failure(b0, 0.0)
    assert b0.state is State.EJECTED
    pool.report_check(b0, True, 1.0)  # a pass does not end an ejection early
    assert b0.state is State.EJECTED
    pool.report_check(b0, False, 1.0)
    assert (b0.state, b0.ejected_until) == (State.DOWN, None)
    pool.advance(100.0)
    assert b0.state is State.DOWN  # down ends by checks, not by time
    assert events(pool) == [("b0", "up", "ejected"), ("b0", "ejected", "down")]


def test_slow_start_ramps_weight() -> None:
    health = HealthConfig(fall=1, rise=1, slow_start=10.0)
    pool = Pool("p", backends(4, 4), health=health, algorithm="weighted_round_robin")
    b0 = pool.backends[0]
    assert b0.effective_weight(0.0) == 4.0  # never down: full weight
    pool.report_check(b0, False, 0.0)
    pool.report_check(b0, True, 100.0)
    assert b0.effective_weight(100.0) == 4.0 * SLOW_START_FLOOR
    assert b0.effective_weight(105.0) == 2.0
    assert b0.effective_weight(110.0) == 4.0
    assert pool.next_wakeup == 110.0
    counts = collections.Counter(b.name for b in pick_n(pool, 100, now=102.5))
    assert counts["b0"] == 100 * 1 / 5  # weight 1 vs 4
    pool.advance(110.0)
    assert (b0.ramp_until, pool.next_wakeup) == (0.0, None)


def test_passive_ejection_is_capped_by_max_ejection_percent() -> None:
    """A fault behind every backend (each answers 5xx in turn) leaves part of the pool in."""
    pool = Pool("p", backends(1, 1, 1, 1), health=HealthConfig(max_fails=1))  # 50 %: 2 of 4
    for b in pool.backends:
        pool.report_failure(b, 0.0)
    assert [b.state for b in pool.backends] == [State.EJECTED] * 2 + [State.UP] * 2
    assert [b.failures for b in pool.backends] == [1, 1, 1, 1]  # still counted
    pool.advance(pool.next_wakeup or 0.0)  # the first two return...
    pool.report_failure(pool.backends[3], 20.0)  # ...so the cap has room again
    assert pool.backends[3].state is State.EJECTED
    single = Pool("one", backends(1), health=HealthConfig(max_fails=1, max_ejection_percent=0))
    single.report_failure(single.backends[0], 0.0)
    assert single.backends[0].state is State.EJECTED  # at least one, as Envoy does


def test_max_ejection_percent_is_a_percentage() -> None:
    with pytest.raises(ConfigError, match="max_ejection_percent must be 0-100"):
        HealthConfig(max_ejection_percent=101)


def test_slow_start_after_ejection_keeps_the_ejection_timer() -> None:
    health = HealthConfig(max_fails=1, ejection_time=5.0, slow_start=10.0, max_ejection_percent=100)
    pool = Pool("p", backends(1, 1), health=health)
    b0, b1 = pool.backends
    pool.report_failure(b1, 0.0)
    pool.report_failure(b0, 1.0)
    pool.advance(5.0)  # b1 back (ramping until 15), b0 still out until 6
    assert (b1.state, b0.state) == (State.UP, State.EJECTED)
    assert pool.next_wakeup == 6.0
    pool.advance(6.0)
    assert pool.next_wakeup == 15.0
    pool.advance(12.0)
    assert pool.next_wakeup == 15.0
    pool.report_check(b0, False, 12.0)
    pool.report_check(b0, False, 12.0)
    pool.report_check(b0, False, 12.0)
    assert b0.ramp_until == 0.0  # going down cancels a ramp


def test_admin_states_and_events() -> None:
    pool = Pool("p", backends(1, 1))
    b0 = pool.backends[0]
    pool.set_admin(b0, Admin.DRAINING, 1.0)
    pool.set_admin(b0, Admin.DRAINING, 2.0)  # no change, no event
    assert b0.status == "draining"
    assert names(pick_n(pool, 2)) == "b1 b1"
    pool.set_admin(b0, Admin.ENABLED, 3.0)
    assert events(pool) == [("b0", "enabled", "draining"), ("b0", "draining", "enabled")]
    assert b0.eligible


def test_membership_add_get_remove() -> None:
    pool = Pool("p", backends(1), algorithm="consistent_hash")
    pool.add(Backend("new", "127.0.0.1", 1))
    with pytest.raises(ValueError, match="exists"):
        pool.add(Backend("new", "127.0.0.1", 2))
    assert {b.name for b in pick_n(pool, 50, key="k", release=False)} <= {"b0", "new"}
    assert pool.get("new").port == 1
    with pytest.raises(KeyError):
        pool.get("nope")
    removed = pool.remove("b0")
    assert removed.name == "b0"
    assert [b.name for b in pool.backends] == ["new"]
    assert pool.acquire(0.0, key="k").name == "new"
    with pytest.raises(ValueError, match="last backend"):
        pool.remove("new")


# ---------------------------------------------------------------- state machine property


class HealthMachine(RuleBasedStateMachine):
    """Any sequence of inputs keeps the invariants and reports every change once."""

    def __init__(self) -> None:
        super().__init__()
        health = HealthConfig(
            rise=2, fall=2, max_fails=2, ejection_time=1.0, max_ejection_time=4.0, slow_start=2.0
        )
        self.pool = Pool("p", backends(1, 2, 3), health=health, algorithm="least_connections")
        self.now = 0.0
        self.seen = {b.name: (b.state.value, b.admin.value) for b in self.pool.backends}
        self.held: list[Backend] = []

    @rule(i=st.integers(0, 2), ok=st.booleans())
    def check(self, i: int, ok: bool) -> None:
        self.pool.report_check(self.pool.backends[i], ok, self.now)

    @rule(i=st.integers(0, 2))
    def failure(self, i: int) -> None:
        self.pool.report_failure(self.pool.backends[i], self.now)

    @rule(i=st.integers(0, 2))
    def success(self, i: int) -> None:
        self.pool.report_success(self.pool.backends[i])

    @rule(i=st.integers(0, 2), admin=st.sampled_from(list(Admin)))
    def set_admin(self, i: int, admin: Admin) -> None:
        self.pool.set_admin(self.pool.backends[i], admin, self.now)

    @rule(dt=st.floats(0.0, 5.0))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        try:
            b = self.pool.acquire(self.now)
        except NoBackendAvailable:
            assert not self.pool.eligible
        else:
            assert b.eligible
            self.held.append(b)

    @rule()
    def release(self) -> None:
        if self.held:
            self.pool.release(self.held.pop())

    @invariant()
    def consistent(self) -> None:
        for e in self.pool.events_received():
            state, admin = self.seen[e.backend]
            if e.old in {s.value for s in State}:
                assert e.old == state
                assert e.new != e.old
                self.seen[e.backend] = (e.new, admin)
            else:
                assert e.old == admin
                self.seen[e.backend] = (state, e.new)
        for b in self.pool.backends:
            assert self.seen[b.name] == (b.state.value, b.admin.value)
            assert (b.ejected_until is not None) == (b.state is State.EJECTED)
            assert b.active >= 0
            assert b.active == sum(1 for h in self.held if h is b)
            assert 0 < b.effective_weight(self.now) <= b.weight
        wake = self.pool.next_wakeup
        for b in self.pool.backends:
            if b.ejected_until is not None:
                assert wake is not None
                assert wake <= b.ejected_until


TestHealthMachine = HealthMachine.TestCase
TestHealthMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

"""Per-key token buckets (the L7 balancer's per-client-IP rate limit), sans-I/O.

Theory of operation
-------------------
Each key (a client IP) owns a bucket of at most ``burst`` tokens that refills at ``rate``
tokens per second; a request takes one token or is refused. This is nginx's
``limit_req`` with ``burst`` and ``nodelay``: a client may send ``burst`` requests at
once, then ``rate`` per second on average. Time is an argument (any monotonic clock, the
same on every call).

A bucket that has refilled to ``burst`` carries no information, so :meth:`prune` drops
them. The table holds at most ``max_keys`` buckets: when a new key finds it full, full
buckets are pruned, and if none is, the oldest key is forgotten (a flood of spoofed
sources cannot grow memory without bound; the cost is that the forgotten key starts
afresh).
"""

from __future__ import annotations

from netstack.proto.chat import TokenBucket


class RateLimiter:
    """Token buckets (:class:`~netstack.proto.chat.TokenBucket`, shared with the chat
    flood control) keyed by string.

    Args:
        rate: tokens added per second (> 0).
        burst: bucket size, the most requests allowed at once (>= 1).
        max_keys: buckets kept at most.

    Raises:
        ValueError: a non-positive rate, burst or max_keys.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket; false when it is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.prune(now)
                if len(self._buckets) >= self.max_keys:
                    del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` has a token again (0 when it has one now, or is unknown),
        as of its last :meth:`allow`."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after()

    def prune(self, now: float) -> None:
        """Forget every bucket that has refilled completely."""
        full = []
        for key, bucket in self._buckets.items():
            bucket.take(now, 0.0)  # refill as of now
            if bucket.tokens >= bucket.burst:
                full.append(key)
        for key in full:
            del self._buckets[key]


__all__ = ["RateLimiter"]

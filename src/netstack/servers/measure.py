"""Measurement helpers shared by the products' load clients."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted, non-empty ``ordered``, by nearest rank.

    Nearest rank returns an observed sample, never an interpolation: the smallest value
    with at least ``q`` % of the samples at or below it.
    """
    n = len(ordered)
    return ordered[min(n - 1, max(0, math.ceil(q / 100 * n) - 1))]

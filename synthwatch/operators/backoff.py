"""Capped exponential backoff with full jitter, shared by everything that retries.

Kept in its own module, free of faust, so that operators (the webhook sink) and the
topology can both use it without the operators importing the topology.
"""

from __future__ import annotations

import random


def backoff(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(max, base * 2^(n-1))].

    Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015) spreads
    the retries of many workers that failed together, so a recovering dependency is not
    hit by all of them at the same instant.
    """
    ceiling = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return (rng or random).uniform(0.0, ceiling)

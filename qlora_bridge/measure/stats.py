"""Paired statistics for the task score: the same prompts answered by the reference model and by an export.

Both models answer the same held-out prompts, so what matters is the discordant pairs: b prompts the reference
gets right and the export gets wrong, c the other way round. Under "the export is as good as the reference"
each discordant pair is a fair coin, so the exact McNemar test is a binomial test on b out of b + c.
"""

from __future__ import annotations

import math
import random


def mcnemar_drop(reference: list[bool], served: list[bool]) -> dict:
    """One-sided exact McNemar test for "the export answers fewer prompts correctly than the reference".

    >>> mcnemar_drop([True] * 9 + [False] * 2, [False] * 9 + [True] * 2)["p_value"]  # b=9, c=2
    0.0327
    """
    if len(reference) != len(served):
        raise ValueError("paired outcomes need the same prompts on both sides")
    b = sum(r and not s for r, s in zip(reference, served))
    c = sum(s and not r for r, s in zip(reference, served))
    n = b + c
    p = sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n if n else 1.0
    return {"reference_only": b, "served_only": c, "p_value": round(p, 4)}


def paired_interval(reference: list[bool], served: list[bool], *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of served score minus reference score, resampling prompts (seeded: the
    same outcomes always give the same interval)."""
    rng = random.Random(seed)
    n = len(reference)
    diffs = [int(s) - int(r) for r, s in zip(reference, served)]
    stats = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int((1 - level) / 2 * resamples)]
    hi = stats[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return round(lo, 4), round(hi, 4)

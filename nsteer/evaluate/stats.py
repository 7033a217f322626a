"""Paired comparisons of verdicts: failures steering fixed, passes it broke, and an exact sign test."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairedChange:
    """Steered against unsteered on the same prompts: how many failures steering fixed and how many passes it broke.

    ``p_value`` is the two-sided exact sign test on the discordant pairs (McNemar's exact test): the chance of a split
    at least this uneven if steering changed verdicts in either direction equally often. 1.0 when nothing changed.
    """

    pairs: int
    gained: int
    lost: int
    p_value: float


def paired_change(unsteered: Mapping[Any, bool], steered: Mapping[Any, bool]) -> PairedChange:
    """Compare loose verdicts prompt by prompt (keys present in both)."""
    keys = unsteered.keys() & steered.keys()
    gained = sum(steered[key] and not unsteered[key] for key in keys)
    lost = sum(unsteered[key] and not steered[key] for key in keys)
    return PairedChange(len(keys), gained, lost, sign_test(gained, lost))


def sign_test(successes: int, failures: int) -> float:
    """Two-sided exact binomial test of ``successes`` against ``failures`` at p = 1/2."""
    trials = successes + failures
    tail = sum(math.comb(trials, i) for i in range(min(successes, failures) + 1)) / 2**trials
    return min(1.0, 2 * tail)

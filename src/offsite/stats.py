"""Uncertainty of accuracy differences: paired bootstrap over evaluation docs.

Two settings scored on the same docs are compared doc by doc (paired), which removes the
variance of which docs were drawn and leaves only the variance of the difference. A
comparison over several tasks is the mean over tasks of the per-task difference, each task's
docs resampled on their own (stratified), so a large task does not outweigh a small one,
exactly as the tables' task means are formed. Several training seeds of one setting enter as
the per-doc mean over seeds (the docs are the same for every seed).

Outcomes are per-doc strings of "0"/"1" as `offsite.evaluation.score_multiple_choice` stores
them, or sequences of numbers in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

Outcomes = str | Sequence[float]


@dataclass(frozen=True)
class Interval:
    """A difference a - b in accuracy points (%), with its 95% paired bootstrap interval."""

    diff: float
    low: float
    high: float
    n_docs: int

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.diff:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"

    def to_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "n_docs": self.n_docs}


def as_array(outcomes: Outcomes) -> np.ndarray:
    if isinstance(outcomes, str):
        if set(outcomes) - {"0", "1"}:
            raise ConfigError("per-doc outcomes must be a string of 0 and 1")
        return np.frombuffer(outcomes.encode(), dtype=np.uint8).astype(np.float64) - ord("0")
    return np.asarray(outcomes, dtype=np.float64)


def seed_mean(runs: Sequence[Outcomes]) -> np.ndarray:
    """Per-doc mean over several runs (seeds) of one setting on the same docs."""
    arrays = [as_array(r) for r in runs]
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise ConfigError("seed_mean needs at least one run, all over the same docs")
    return np.mean(arrays, axis=0)


def paired_bootstrap(a: Sequence[Outcomes], b: Sequence[Outcomes], resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> Interval:
    """Mean over tasks of acc(a) - acc(b), in points, with a stratified paired bootstrap interval.

    `a` and `b` hold one outcome array per task; a[t] and b[t] must score the same docs in the
    same order.
    """
    if len(a) != len(b) or not a:
        raise ConfigError(f"paired_bootstrap needs the same non-zero number of tasks on both sides, got {len(a)} and {len(b)}")
    diffs = []
    for x, y in zip(a, b):
        x, y = as_array(x), as_array(y)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ConfigError(f"paired outcomes must be non-empty and over the same docs, got {x.shape} and {y.shape}")
        diffs.append(x - y)
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs]))
    samples = np.zeros(resamples)
    for d in diffs:  # stratified: each task's docs resampled within the task
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        samples += d[idx].mean(axis=1)
    samples /= len(diffs)
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(100 * point, 100 * float(low), 100 * float(high), int(sum(d.size for d in diffs)))

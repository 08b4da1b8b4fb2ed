"""Confidence intervals for metric means.

Design decisions:

- Percentile bootstrap with numpy only (no scipy): resample items with replacement, take the mean of
  each resample, and report the ``(1 - confidence) / 2`` and ``1 - (1 - confidence) / 2`` percentiles of
  those means. The point estimate is the plain sample mean, not the mean of the resampled means.
- A fixed ``seed`` (``numpy.random.default_rng``) makes every interval reproducible run to run.
- Paired comparisons (two systems on the same prompts) bootstrap the per-item differences ``a - b``,
  so the prompt-to-prompt variance that both systems share cancels. Identical inputs give exactly
  ``(0.0, 0.0, 0.0)``.
- A ratio of sums (a share of a total, each item contributing to both) is bootstrapped as a ratio: every
  resample sums numerator and denominator over the same drawn items, so items weigh by their size.
- Resamples are drawn in chunks of at most about a million indices, so long metric lists do not build
  one ``[n_resamples, N]`` index matrix at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_difference", "ratio_ci"]

_MAX_INDICES_PER_CHUNK = 1 << 20


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)  # [N]
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one per-item metric value.")
    if not np.all(np.isfinite(array)):
        bad = array[~np.isfinite(array)][:3].tolist()
        raise ValueError(f"{name} contains non-finite values {bad}; drop or fix those items before bootstrapping.")
    return array


def _resampled_indices(n: int, n_resamples: int, confidence: float, seed: int):
    """Yield ``[rows, n]`` index chunks, ``n_resamples`` rows in all, drawn with replacement from ``range(n)``."""
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} must be a positive integer (1000 is usual).")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1, e.g. 0.95.")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_INDICES_PER_CHUNK // n)
    for start in range(0, n_resamples, rows_per_chunk):
        yield rng.integers(0, n, size=(min(rows_per_chunk, n_resamples - start), n))  # [rows, N]


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Sample mean of ``values`` and its percentile-bootstrap confidence interval.

    Args:
        values: per-item metric values, ``[N]``.
        n_resamples: bootstrap resamples (each draws ``N`` items with replacement).
        confidence: interval mass in (0, 1), e.g. 0.95.
        seed: seed of the numpy generator.

    Returns:
        ``(mean, low, high)``; for one value all three are that value.
    """
    array = _as_values(values, "values")
    chunks = _resampled_indices(array.size, n_resamples, confidence, seed)
    means = np.concatenate([array[indices].mean(axis=1) for indices in chunks])  # [n_resamples]
    return (float(array.mean()), *_percentiles(means, confidence))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (same prompts) with a bootstrap interval over items.

    Returns:
        ``(mean_diff, low, high)``; an interval that excludes 0 means ``a`` and ``b`` differ at that confidence.
    """
    first, second = _as_values(a, "a"), _as_values(b, "b")
    if first.size != second.size:
        raise ValueError(
            f"a has {first.size} items and b has {second.size}; paired_difference needs the same prompts "
            "in the same order for both (use bootstrap_ci on each for unpaired data)."
        )
    return bootstrap_ci(first - second, n_resamples=n_resamples, confidence=confidence, seed=seed)


def ratio_ci(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``sum(numerator) / sum(denominator)`` over paired items and its percentile-bootstrap interval.

    Returns:
        ``(ratio, low, high)``; resamples whose denominator sums to 0 are dropped.
    """
    top, bottom = _as_values(numerator, "numerator"), _as_values(denominator, "denominator")
    if top.size != bottom.size:
        raise ValueError(f"numerator has {top.size} items and denominator {bottom.size}; pass one pair per item.")
    if bottom.sum() == 0:
        raise ValueError("the denominator sums to 0, so the ratio is undefined; check the per-item totals.")
    ratios = []
    for indices in _resampled_indices(top.size, n_resamples, confidence, seed):
        num, den = top[indices].sum(axis=1), bottom[indices].sum(axis=1)
        ratios.append(num[den != 0] / den[den != 0])
    return (float(top.sum() / bottom.sum()), *_percentiles(np.concatenate(ratios), confidence))

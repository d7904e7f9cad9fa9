"""Statistics over seeds: summaries, paired differences and ratios with 95% CIs, verdict sentences.

Pure functions on plain numbers. Confidence intervals are Student t intervals (df = n - 1) on the
paired values; ratios (deformable / regular epoch time) are summarised on their logarithms, so the
centre is the geometric mean ratio and the interval is multiplicative.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95
ONE_SEED_VERDICT = "one seed: no verdict, sweep seed=0,1,2"


def finite(values: Sequence[Any]) -> list[float]:
    """The values that are finite numbers, as floats (None, NaN, inf and non-numbers dropped)."""
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]


def summarize(values: Sequence[Any]) -> dict[str, Any]:
    """``n, mean, std, min, max`` of the finite values; ``std`` is the sample std (ddof=1), None for n < 2."""
    xs = finite(values)
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "min": min(xs),
        "max": max(xs),
    }


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile for ``confidence`` with ``df`` degrees of freedom."""
    # deferred: scipy.stats takes ~0.5 s to import, and every dcn-train start imports this module
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.5 + confidence / 2, df))


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the t interval of the mean (df = n - 1); None for fewer than 2 values."""
    xs = finite(values)
    if len(xs) < 2:
        return None
    mean = statistics.fmean(xs)
    half = t_quantile(len(xs) - 1, confidence) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def paired_difference(pairs: Sequence[tuple[Any, float, float]]) -> dict[str, Any]:
    """Treatment - baseline over ``(seed, baseline, treatment)`` pairs: ``n, seeds, values, mean, std, ci95``.

    ``ci95`` is ``[low, high]`` of the t interval on the differences, None for fewer than 2 pairs.
    """
    seeds = [seed for seed, _, _ in pairs]
    values = [treatment - baseline for _, baseline, treatment in pairs]
    summary = summarize(values)
    ci = mean_ci(values)
    return {
        "n": len(values),
        "seeds": seeds,
        "values": values,
        "mean": summary["mean"],
        "std": summary["std"],
        "ci95": [ci[1], ci[2]] if ci else None,
    }


def paired_ratio(pairs: Sequence[tuple[Any, float, float]]) -> dict[str, Any]:
    """Treatment / baseline over ``(seed, baseline, treatment)`` pairs with positive values.

    ``mean`` is the geometric mean ratio and ``ci95`` the t interval on the log ratios, exponentiated
    (None for fewer than 2 pairs).
    """
    kept = [(seed, b, t) for seed, b, t in pairs if b > 0 and t > 0]
    ratios = [t / b for _, b, t in kept]
    ci = mean_ci([math.log(r) for r in ratios])
    return {
        "n": len(ratios),
        "seeds": [seed for seed, _, _ in kept],
        "values": ratios,
        "mean": math.exp(statistics.fmean(math.log(r) for r in ratios)) if ratios else None,
        "ci95": [math.exp(ci[1]), math.exp(ci[2])] if ci else None,
        "method": "t interval on log(deformable / regular), exponentiated: geometric mean ratio",
    }


def difference_verdict(difference: dict[str, Any], treatment: str = "deformable", digits: int = 4) -> str:
    """One sentence on a paired difference: better / worse when the CI excludes 0, else what is detectable."""
    n = difference["n"]
    if n == 0:
        return "no seed where both arms completed: no verdict"
    if n == 1:
        return ONE_SEED_VERDICT
    low, high = difference["ci95"]
    ci = f"95% CI {low:.{digits}f}..{high:.{digits}f}"
    if low > 0:
        return f"{treatment} better by {difference['mean']:.{digits}f} ({ci}, {n} seeds)"
    if high < 0:
        return f"{treatment} worse by {-difference['mean']:.{digits}f} ({ci}, {n} seeds)"
    return f"no difference detectable at {n} seeds ({ci}, width {high - low:.{digits}f})"


def cost_verdict(ratio: dict[str, Any], treatment: str = "deformable", what: str = "the epoch time") -> str:
    """One sentence on a paired cost ratio, e.g. ``deformable costs 1.90x the epoch time (95% CI ...)``."""
    n = ratio["n"]
    if n == 0:
        return "no seed where both arms completed with a time: no cost verdict"
    head = f"{treatment} costs {ratio['mean']:.2f}x {what}"
    if n == 1:
        return f"{head} (one seed: no CI, sweep seed=0,1,2)"
    low, high = ratio["ci95"]
    ci = f"95% CI {low:.2f}..{high:.2f}x, {n} seeds"
    if low <= 1 <= high:
        return f"{head} ({ci}; not distinguishable from 1x)"
    return f"{head} ({ci})"

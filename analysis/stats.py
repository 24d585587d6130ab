"""95% confidence intervals over seeds: Student t for one model's mean, Welch for the difference of two."""
from __future__ import annotations

import math

import pandas as pd
from scipy import stats

LEVEL = 0.95


def t_quantile(dof: float) -> float:
    """The two-sided ``LEVEL`` quantile of Student's t with ``dof`` degrees of freedom; NaN for dof <= 0."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, dof)) if dof > 0 else math.nan


def ci_half_width(values: pd.Series) -> float:
    """Half-width of the 95% CI of the mean of ``values`` (Student t, n - 1 dof); NaN under 2 values."""
    values = values.dropna()
    n = len(values)
    return t_quantile(n - 1) * values.std(ddof=1) / math.sqrt(n) if n >= 2 else math.nan


def welch_half_width(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """Half-width of the 95% CI of a difference of two means (Welch: unequal variances, Welch-Satterthwaite
    dof); NaN unless both sides have 2 values or more. Two spread-free sides give 0."""
    if n_a < 2 or n_b < 2:
        return math.nan
    var_a, var_b = std_a ** 2 / n_a, std_b ** 2 / n_b
    if var_a + var_b == 0:
        return 0.0
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    return t_quantile(dof) * math.sqrt(var_a + var_b)


def compare_to_best(agg: pd.DataFrame, metric: str, within: list[str]) -> pd.DataFrame:
    """Per row, the difference of ``<metric>_mean`` to the best row of its ``within`` group, with its Welch
    95% CI: ``best_model``, ``is_best``, ``diff_vs_best``, ``diff_vs_best_ci`` (half-width) and
    ``diff_vs_best_significant`` (the CI excludes 0; missing where it cannot be computed or for the best)."""
    mean, std, n = agg[f"{metric}_mean"], agg[f"{metric}_std"], agg[f"{metric}_n"]
    # A row without the metric is never the best (idxmax of an all-missing group would fail).
    best = mean.fillna(-math.inf).groupby([agg[c] for c in within], dropna=False).transform("idxmax")
    out = pd.DataFrame(index=agg.index)
    out["best_model"] = agg.loc[best, "model"].to_numpy()
    out["is_best"] = (best == agg.index) & mean.notna()
    out["diff_vs_best"] = mean - mean[best].to_numpy()
    out["diff_vs_best_ci"] = [welch_half_width(std[i], n[i], std[b], n[b]) for i, b in zip(agg.index, best)]
    significant = (out["diff_vs_best"].abs() > out["diff_vs_best_ci"]).astype("boolean")
    out["diff_vs_best_significant"] = significant.mask(out["diff_vs_best_ci"].isna() | out["is_best"])
    return out

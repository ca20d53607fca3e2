"""How sure is a figure? Mean and spread over training seeds, and a bootstrap interval over prompts.

Two sources of noise sit in every number the pipeline reports:

* the training run: another seed gives other initial weights and another batch order. Repeat the run with
  seeds s_1..s_k and report  mean ± std,  std = sqrt( sum_i (x_i - mean)^2 / (k - 1) )  (Bessel-corrected);
* the test set: a figure averaged over n prompts would differ on other prompts from the same world. The
  percentile bootstrap (Efron, 1979) estimates that spread from the sample itself: draw n prompts with
  replacement B times, take the mean of each draw, and report the alpha/2 and 1 - alpha/2 quantiles of those
  B means as the (1 - alpha) interval.

A stage's effect is "beyond noise" when the difference it makes exceeds both.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with k - 1 in the denominator); std is 0.0 for a single value."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std: need at least one value")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`:

        m_b = mean(x[i_b1], ..., x[i_bn]),  i_bj ~ Uniform{1..n},  b = 1..B
        interval = ( quantile_{alpha/2}(m), quantile_{1 - alpha/2}(m) ),  alpha = 1 - confidence
    """
    if not values:
        raise ValueError("bootstrap_ci: need at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)  # (n,)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_resamples, x.numel()), generator=gen)  # (B, n)
    means = x[idx].mean(dim=1)  # (B,)
    alpha = 1.0 - confidence
    low, high = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(low), float(high)

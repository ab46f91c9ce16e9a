"""Offline tuning of request policies on validation devices: the IDEAL mapper and gate thresholds.

Nothing here runs on a device. The simulation (`harness.py`) replays validation devices to
collect examples and request rates; these functions turn them into the mapper weights and the
thresholds that the test devices - or real ones - then run with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.device.ideal import GaussianMapper, mapper_features

# E[log chi^2_1]: the mean of log(r^2) for r ~ N(0, 1); fitting log-variance to log squared
# residuals is biased down by this much.
_LOG_CHI2_MEAN = -1.2703628454614782


def fit_gaussian_mapper(behaviour: np.ndarray, ref: np.ndarray, delta: np.ndarray,
                        ridge: float = 1.0) -> GaussianMapper:
    """Fit the mapper on examples from validation devices, in closed form.

    behaviour, ref (n, d): behaviour now and at the held bundle; delta (n, d): how much a bundle
    generated now would change the user state (fresh - held). The mean is a ridge regression;
    the log-variance regresses log squared residuals on the variance features (heteroscedastic
    least squares), corrected for the log-chi-square bias.
    """
    x, z = mapper_features(behaviour, ref)
    x64, z64, y = x.astype(np.float64), z.astype(np.float64), delta.astype(np.float64)
    gram = x64.T @ x64 + ridge * np.eye(x64.shape[1])
    w_mean = np.linalg.solve(gram, x64.T @ y)  # (2d + 1, d)
    resid = y - x64 @ w_mean
    target = np.log(resid * resid + 1e-10) - _LOG_CHI2_MEAN  # (n, d)
    w_log_var = np.linalg.lstsq(z64, target, rcond=None)[0]  # (2, d)
    explained = 1.0 - float((resid**2).sum() / max(((y - y.mean(0)) ** 2).sum(), 1e-12))
    return GaussianMapper(w_mean.astype(np.float32), w_log_var.astype(np.float32),
                          {"examples": len(y), "r2_mean": explained, "ridge": ridge})


def calibrate_threshold(rate_at: Callable[[float], float], target: float, scores: np.ndarray,
                        tolerance: float | None = None, max_iter: int = 30) -> tuple[float, float]:
    """Threshold at which `rate_at(threshold)` (the request rate a replay reaches) meets `target`.

    `scores` are gate scores seen on the same devices (e.g. in a replay that never requests) and
    bracket the search; bisection runs over their quantiles, because the rate is monotone in the
    threshold but gate scores are far from uniformly spread. Returns (threshold, rate reached):
    the lowest-threshold point whose rate does not exceed the target unless none is within
    tolerance (default: 3% of the target, at least 0.001), in which case the closest one.
    """
    if tolerance is None:
        tolerance = max(0.001, 0.03 * target)
    finite = np.sort(scores[np.isfinite(scores)])
    if len(finite) == 0:
        raise InvalidInput("scores", "no finite gate scores to calibrate on")

    def at(q: float) -> float:
        return float(np.quantile(finite, q))

    lo, hi = 0.0, 1.0  # quantile bracket: rate_at(at(lo)) >= target >= rate_at(at(hi)) hopefully
    best: tuple[float, float] | None = None
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        threshold = at(mid)
        rate = rate_at(threshold)
        if best is None or abs(rate - target) < abs(best[1] - target):
            best = (threshold, rate)
        if abs(rate - target) <= tolerance:
            return threshold, rate
        if rate > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1.0 / (4 * len(finite)):
            break
    assert best is not None
    return best

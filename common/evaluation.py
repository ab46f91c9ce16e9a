"""The field's evaluation protocol (SASRec, Kang & McAuley 2018), on numpy only.

Leave-one-out per user in time order: the last item is the test target, the second-to-last the
validation target, the rest is training. Users with fewer than 3 interactions only train. A case
ranks the true item among `n_negatives` items sampled uniformly, with a fixed seed, from those the
user never interacted with (or, optionally, against the full catalogue). Metrics are averaged over
users; confidence intervals come from a bootstrap over users, and paired differences between two
variants are bootstrapped on the per-user differences so the interval reflects the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramcast.common.interactions import InteractionLog

STAGES = ("valid", "test")
METRICS = ("hr@10", "ndcg@10", "mrr", "auc")


@dataclass
class LeaveOneOut:
    """Leave-one-out view of a log; `users` restricts it (e.g. to warm or to cold users)."""

    log: InteractionLog
    users: np.ndarray  # int64 user indices this split covers

    @classmethod
    def of(cls, log: InteractionLog, users: np.ndarray | None = None) -> LeaveOneOut:
        if users is None:
            users = np.arange(log.n_users)
        return cls(log, np.asarray(users, dtype=np.int64))

    def eval_users(self) -> np.ndarray:
        """Users with at least 3 interactions: they get a validation and a test case."""
        lengths = self.log.lengths()[self.users]
        return self.users[lengths >= 3]

    def train_sequence(self, user: int) -> np.ndarray:
        seq = self.log.sequences[user]
        return seq[:-2] if len(seq) >= 3 else seq

    def train_sequences(self) -> list[np.ndarray]:
        return [self.train_sequence(int(u)) for u in self.users]

    def case(self, user: int, stage: str) -> tuple[np.ndarray, int]:
        """(history, target) of `user` at `stage`: validation hides the last two items, test the last."""
        seq = self.log.sequences[user]
        cut = {"valid": len(seq) - 2, "test": len(seq) - 1}[stage]
        return seq[:cut], int(seq[cut])


def sample_negatives(
    log: InteractionLog, users: np.ndarray, n: int = 100, seed: int = 0
) -> np.ndarray:
    """(U, n) item ids drawn uniformly, per user, from items that user never interacted with.

    Draws without replacement within a user. The stream depends only on (seed, user order), so
    every model evaluated with the same seed sees the same candidates.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(users), n), dtype=np.int64)
    for row, user in enumerate(users):
        seen = np.unique(log.sequences[int(user)])
        available = log.n_items - len(seen)
        if available < n:
            raise ValueError(f"user {log.user_raw_ids[user]} has only {available} unseen items; need {n}")
        picked: np.ndarray = np.empty(0, dtype=np.int64)
        while len(picked) < n:
            draw = rng.integers(1, log.n_items + 1, size=2 * n)
            draw = draw[~np.isin(draw, seen)]
            picked = np.concatenate([picked, draw])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]
        out[row] = picked[:n]
    return out


def metrics_from_scores(scores: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user metrics from (U, 1 + C) scores whose column 0 is the true item.

    Ties count against the true item (a constant scorer gets rank C, not 0), so a degenerate
    model cannot look good.
    """
    pos = scores[:, :1]
    neg = scores[:, 1:]
    rank = (neg >= pos).sum(axis=1)  # 0 = true item ranked first
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    auc = ((pos > neg).sum(axis=1) + 0.5 * (pos == neg).sum(axis=1)) / neg.shape[1]
    return {f"hr@{k}": hit.astype(np.float64), f"ndcg@{k}": ndcg, "mrr": 1.0 / (rank + 1.0), "auc": auc}


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over users (resampling users with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(values))  # bound memory for large user counts
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def summarize(per_user: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict]:
    """{metric: {"value": mean, "ci": [lo, hi], "users": U}} — the layout `paramcast evaluate --json` prints."""
    return {
        name: {
            "value": float(np.mean(vals)) if len(vals) else float("nan"),
            "ci": list(bootstrap_ci(vals, seed=seed)),
            "users": int(len(vals)),
        }
        for name, vals in per_user.items()
    }


def paired_difference(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int = 0
) -> dict[str, dict]:
    """Summary of a - b per metric, bootstrapped over the per-user differences (same users, same order)."""
    return summarize({m: a[m] - b[m] for m in a if m in b}, seed=seed)


def gap_closed(generated: dict[str, np.ndarray], static: dict[str, np.ndarray], cloud: dict[str, np.ndarray],
               n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """(generated - static) / (cloud - static) per metric: the share of the cloud's lead over the
    device model that the generated delta carries. The bootstrap resamples users once for both
    differences, so the interval reflects the pairing; it is wide (or NaN) where cloud - static is
    itself indistinguishable from zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in generated:
        num = np.asarray(generated[m] - static[m], dtype=np.float64)
        den = np.asarray(cloud[m] - static[m], dtype=np.float64)
        idx = rng.integers(0, len(num), size=(n_boot, len(num)))
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(num.mean() / den.mean())
            ratios = num[idx].mean(axis=1) / den[idx].mean(axis=1)
        lo, hi = np.quantile(ratios, [0.025, 0.975]) if np.isfinite(ratios).all() else (np.nan, np.nan)
        out[m] = {"value": value, "ci": [float(lo), float(hi)], "users": int(len(num))}
    return out


def full_ranking_scores(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray]) -> np.ndarray:
    """Turn (U, n_items + 1) catalogue scores into (U, 1 + n_items - 1) rows for `metrics_from_scores`.

    Column 0 holds the target's score; the padding id and the user's other seen items are pushed to
    -inf so they never outrank it (the usual full-ranking protocol).
    """
    scores = scores.astype(np.float64, copy=True)
    scores[:, 0] = -np.inf
    for row, seen in enumerate(exclude):
        seen = seen[seen != targets[row]]
        scores[row, seen] = -np.inf
    pos = scores[np.arange(len(targets)), targets][:, None]
    scores[np.arange(len(targets)), targets] = -np.inf  # the target appears once, in column 0
    return np.concatenate([pos, scores[:, 1:]], axis=1)

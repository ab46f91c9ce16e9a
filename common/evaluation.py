"""The field's evaluation protocol (SASRec, Kang & McAuley 2018), on numpy only.

Leave-one-out per user in time order: the last item is the test target, the second-to-last the
validation target, the rest is training. Users with fewer than 3 interactions only train. Two
protocols rank a case's true item:
- `sampled`: among `n_negatives` items sampled uniformly, with a fixed seed, from those the user
  never interacted with (the field's protocol; metrics `hr@10`, `ndcg@10`, `mrr`, `auc`);
- `full`: among the whole catalogue, the user's other items excluded (what a deployed recommender
  does; Krichene & Rendle, KDD 2020, showed sampled metrics can invert a comparison; metrics
  `full:hr@10`, `full:ndcg@10`, `full:mrr`).
Metrics are averaged over users; confidence intervals come from a bootstrap over users, and paired
differences between two variants are bootstrapped on the per-user differences so the interval
reflects the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramcast.common.interactions import InteractionLog

STAGES = ("valid", "test")
METRICS = ("hr@10", "ndcg@10", "mrr", "auc")
PROTOCOLS = ("sampled", "full", "both")
FULL_PREFIX = "full:"  # metric names of the full-catalogue protocol, beside the sampled ones


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


def metrics_from_ranks(rank: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user HR@k, NDCG@k and MRR from 0-based ranks of the true item."""
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return {f"hr@{k}": hit.astype(np.float64), f"ndcg@{k}": ndcg, "mrr": 1.0 / (rank + 1.0)}


def metrics_from_scores(scores: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user metrics from (U, 1 + C) scores whose column 0 is the true item.

    Ties count against the true item (a constant scorer gets rank C, not 0), so a degenerate
    model cannot look good.
    """
    pos = scores[:, :1]
    neg = scores[:, 1:]
    rank = (neg >= pos).sum(axis=1)  # 0 = true item ranked first
    auc = ((pos > neg).sum(axis=1) + 0.5 * (pos == neg).sum(axis=1)) / neg.shape[1]
    return {**metrics_from_ranks(rank, k), "auc": auc}


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


def full_ranks(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among the whole catalogue, from (U, n_items + 1) scores.

    The padding id and the user's other items (`exclude[u]`, e.g. the whole sequence; the target
    itself may be in it) never outrank the target, as in the usual full-ranking protocol; ties
    count against the target. Vectorised: the excluded cells are set in one scatter."""
    rows = np.arange(len(targets))
    scores = np.array(scores, dtype=np.float32, copy=True)  # (U, V)
    target_scores = scores[rows, targets].copy()  # (U,)
    lengths = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(exclude))
    if lengths.sum():
        scores[np.repeat(rows, lengths), np.concatenate(exclude).astype(np.int64)] = -np.inf
    scores[:, 0] = -np.inf
    scores[rows, targets] = -np.inf  # the target is compared with the others, not with itself
    return (scores >= target_scores[:, None]).sum(axis=1)


def full_ranking_metrics(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray],
                         k: int = 10) -> dict[str, np.ndarray]:
    """`full:hr@k`, `full:ndcg@k`, `full:mrr` per user (see `full_ranks`)."""
    ranks = full_ranks(scores, targets, exclude)
    return {FULL_PREFIX + name: vals for name, vals in metrics_from_ranks(ranks, k).items()}

"""The SASRec protocol: split, negatives, metrics, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from paramcast.common.data import load_interactions
from paramcast.common.evaluation import (
    LeaveOneOut,
    bootstrap_ci,
    full_ranking_metrics,
    full_ranks,
    metrics_from_scores,
    paired_difference,
    sample_negatives,
    summarize,
)
from paramcast.common.interactions import InteractionLog


def tiny_log() -> InteractionLog:
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([2, 7, 8])]
    return InteractionLog("tiny", seqs, 300, ["a", "b", "c"], [""] + [str(i) for i in range(1, 301)])


def test_leave_one_out_hides_last_two_and_keeps_short_users_in_training():
    split = LeaveOneOut.of(tiny_log())
    assert list(split.eval_users()) == [0, 2]  # user 1 has 2 interactions: training only
    assert split.train_sequence(0).tolist() == [1, 2]
    assert split.train_sequence(1).tolist() == [5, 6]
    hist, target = split.case(0, "valid")
    assert hist.tolist() == [1, 2] and target == 3
    hist, target = split.case(0, "test")
    assert hist.tolist() == [1, 2, 3] and target == 4


def test_negatives_are_unseen_distinct_and_seeded(shared_data):
    data = load_interactions(shared_data / "ml-100k")
    users = np.arange(50)
    a = sample_negatives(data, users, n=100, seed=3)
    assert a.shape == (50, 100)
    assert np.array_equal(a, sample_negatives(data, users, n=100, seed=3))
    assert not np.array_equal(a, sample_negatives(data, users, n=100, seed=4))
    for row, u in enumerate(users):
        assert len(set(a[row])) == 100
        assert not set(a[row]) & set(data.sequences[u].tolist())
        assert a[row].min() >= 1 and a[row].max() <= data.n_items


def test_metrics_known_ranks():
    # true item (column 0) ranked 1st, 3rd, and below 10 of 11.
    scores = np.array([
        [9.0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0],
        [7.0, 9, 8, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    m = metrics_from_scores(scores, k=10)
    assert m["hr@10"].tolist() == [1.0, 1.0, 0.0]
    assert m["ndcg@10"][0] == pytest.approx(1.0)
    assert m["ndcg@10"][1] == pytest.approx(1 / np.log2(4))
    assert m["mrr"][1] == pytest.approx(1 / 3)
    assert m["auc"][0] == pytest.approx(1.0) and m["auc"][2] == pytest.approx(0.0)


def test_ties_count_against_the_true_item():
    m = metrics_from_scores(np.zeros((4, 101)))
    assert m["hr@10"].sum() == 0 and np.allclose(m["auc"], 0.5)


def test_bootstrap_ci_covers_mean_and_shrinks_with_users():
    rng = np.random.default_rng(0)
    small, large = rng.random(100), rng.random(10_000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 5


def test_paired_difference_sees_a_consistent_small_gain():
    rng = np.random.default_rng(1)
    base = rng.random(2000)
    better = base + 0.01  # same users, every one slightly better
    diff = paired_difference({"ndcg@10": better}, {"ndcg@10": base})["ndcg@10"]
    assert diff["value"] == pytest.approx(0.01)
    assert diff["ci"][0] > 0.0099
    unpaired = summarize({"ndcg@10": better})["ndcg@10"]
    assert unpaired["ci"][0] < base.mean()  # unpaired intervals would overlap


def test_full_ranking_excludes_the_users_other_items_and_padding():
    scores = np.array([[50.0, 10, 9, 3, 8],  # items 0..4; the user saw 2 and 4; target 3
                       [0.0, 1, 5, 5, 2]])  # target 2 ties with unseen item 3
    exclude = [np.array([2, 4, 3]), np.array([2])]
    ranks = full_ranks(scores, np.array([3, 2]), exclude)
    # Padding (0) and seen items 2, 4 outscore the target but are excluded; unseen item 1 is not.
    # A tie with an unseen item counts against the target.
    assert ranks.tolist() == [1, 1]
    assert full_ranks(scores, np.array([3, 2]), [np.array([], dtype=np.int64)] * 2).tolist() == [3, 1]
    m = full_ranking_metrics(scores, np.array([3, 2]), exclude)
    assert sorted(m) == ["full:hr@10", "full:mrr", "full:ndcg@10"]
    assert m["full:mrr"].tolist() == pytest.approx([1 / 2, 1 / 2])
    assert scores[0, 2] == 9  # the caller's scores are left as they were


def test_gap_closed_is_the_share_of_the_cloud_lead_with_a_paired_interval():
    from paramcast.common.evaluation import gap_closed

    rng = np.random.default_rng(0)
    static = {"ndcg@10": rng.random(500)}
    cloud = {"ndcg@10": static["ndcg@10"] + 0.2 + 0.01 * rng.standard_normal(500)}
    generated = {"ndcg@10": static["ndcg@10"] + 0.1 + 0.01 * rng.standard_normal(500)}
    out = gap_closed(generated, static, cloud)["ndcg@10"]
    assert abs(out["value"] - 0.5) < 0.01
    lo, hi = out["ci"]
    assert lo < out["value"] < hi and hi - lo < 0.05 and out["users"] == 500
    # No cloud lead: the ratio has no meaning and says so with a non-finite interval or value.
    flat = gap_closed(generated, static, {"ndcg@10": static["ndcg@10"].copy()})["ndcg@10"]
    assert not np.isfinite(flat["value"])

"""Training losses (cloud/losses.py) on tiny models: each learns a planted pattern; the pieces are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paramcast.cloud.losses import (
    BASE_LOSSES,
    LossConfig,
    bce_loss,
    full_softmax_loss,
    gbce_beta,
    negative_logits,
    sampled_softmax_loss,
    sequence_loss,
    target_logits,
    uniform_negatives,
)
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad

N_ITEMS = 40


def planted_sequences(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """Item i is always followed by item i + 1 (cyclically): a pattern every loss should learn."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, N_ITEMS) + np.arange(length)) % N_ITEMS + 1 for _ in range(n)]


@pytest.mark.parametrize("name", [*BASE_LOSSES, "ce+bce"])
def test_each_loss_decreases_and_ranks_the_planted_next_item(name):
    torch.manual_seed(0)
    model = DeviceModel(DeviceModelConfig(n_items=N_ITEMS, hidden=16, n_blocks=1, ffn_units=16, head_units=16,
                                          max_len=8, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    cfg = LossConfig(name=name, n_negatives=8 if name in ("gbce", "sampled") else 0)
    gen = torch.Generator().manual_seed(1)
    x = left_pad(planted_sequences(64, 9), 9)  # (64, 9)
    inp, tgt = x[:, :-1], x[:, 1:]
    losses = []
    for _ in range(150):
        loss = sequence_loss(cfg, model.user_states(inp), model.item_emb.weight, tgt, x, N_ITEMS, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    model.eval()
    test = left_pad(planted_sequences(50, 6, seed=9), 8)  # unseen starts
    with torch.no_grad():
        scores = model.user_states(test)[:, -1, :] @ model.item_emb.weight.T  # (50, n_items + 1)
    scores[:, 0] = float("-inf")
    scores.scatter_(1, test, float("-inf"))  # the user's own items are never ranked (both protocols)
    expected = test[:, -1] % N_ITEMS + 1
    assert (scores.argmax(1) == expected).float().mean() > 0.9


def test_negatives_avoid_the_rows_own_items_and_mask_what_cannot_be_avoided():
    gen = torch.Generator().manual_seed(0)
    avoid = torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
    negs, valid = uniform_negatives(avoid, 10, 50, positions=3, generator=gen)
    assert negs.shape == valid.shape == (2, 3, 50)
    assert negs.min() >= 1 and negs.max() <= 10
    for row in range(2):
        drawn = negs[row][valid[row]]
        assert not set(drawn.tolist()) & set(avoid[row].tolist())
    assert set(negs[0][valid[0]].tolist()) == set(range(4, 11))  # uniform over what is left
    # A row that saw every item but one: only that item is a valid negative, the rest are masked.
    full = torch.arange(1, 10).unsqueeze(0)  # items 1..9 of 10
    negs, valid = uniform_negatives(full, 10, 200, positions=1, generator=gen, redraws=0)
    assert set(negs[valid].tolist()) == {10}
    assert 0 < valid.float().mean() < 0.3


def test_gbce_beta_spans_bce_to_calibrated():
    assert gbce_beta(256, 12_101, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE
    assert gbce_beta(256, 12_101, 1.0) == pytest.approx(256 / 12_100)  # t = 1: beta = alpha
    assert gbce_beta(256, 12_101, 0.75) == pytest.approx(0.25 + 0.75 * 256 / 12_100)


def test_bce_is_sasrecs_binary_loss_and_masks_padding():
    pos = torch.tensor([[2.0, -1.0, 5.0]])
    neg = torch.tensor([[[0.5], [1.0], [9.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the last position is padding
    valid = torch.ones_like(neg)
    expected = np.mean([-np.log(1 / (1 + np.exp(-p))) - np.log(1 - 1 / (1 + np.exp(-n)))
                        for p, n in [(2.0, 0.5), (-1.0, 1.0)]])
    assert bce_loss(pos, neg, mask, valid).item() == pytest.approx(expected, rel=1e-5)
    assert bce_loss(pos, neg, mask, valid, beta=0.5).item() < bce_loss(pos, neg, mask, valid).item()


def test_sampled_softmax_over_every_other_item_is_the_full_softmax():
    torch.manual_seed(0)
    states = torch.randn(2, 3, 4)
    table = torch.randn(6, 4)  # 5 items
    targets = torch.tensor([[1, 2, 3], [0, 4, 5]])
    # Negatives: every item except the position's target -> per-position (B, L, 4).
    others = torch.stack([torch.stack([torch.tensor([i for i in range(1, 6) if i != max(t, 1)]) for t in row])
                          for row in targets.tolist()])
    pos = target_logits(states, table, targets)
    neg = negative_logits(states, table, others)
    mask = (targets > 0).float()
    sampled = sampled_softmax_loss(pos, neg, mask, torch.ones_like(neg, dtype=torch.bool))
    assert sampled.item() == pytest.approx(full_softmax_loss(states, table, targets).item(), rel=1e-5)
    # logQ correction with uniform q adds log(n_items / k) to every negative: a larger loss.
    corrected = sampled_softmax_loss(pos, neg, mask, torch.ones_like(neg, dtype=torch.bool), np.log(4 / 5))
    assert corrected.item() > sampled.item()


def test_shared_negatives_score_like_per_position_ones():
    torch.manual_seed(0)
    states, table = torch.randn(2, 3, 4), torch.randn(9, 4)
    shared = torch.tensor([[[1, 5, 7]], [[2, 3, 8]]])  # (B, 1, k)
    torch.testing.assert_close(negative_logits(states, table, shared),
                               negative_logits(states, table, shared.expand(-1, 3, -1).contiguous()))


def test_a_mixture_is_the_weighted_sum_and_unknown_losses_are_named():
    torch.manual_seed(0)
    states, table = torch.randn(2, 3, 4), torch.randn(11, 4)
    targets = torch.tensor([[1, 2, 3], [0, 4, 5]])
    avoid = torch.cat([targets, targets], 1)

    def loss(name, weight=1.0):
        return sequence_loss(LossConfig(name=name, mix_weight=weight), states, table, targets, avoid, 10,
                             torch.Generator().manual_seed(3)).item()

    assert loss("ce+bce", 0.5) == pytest.approx(loss("ce") + 0.5 * loss("bce"), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        LossConfig(name="hinge").components()

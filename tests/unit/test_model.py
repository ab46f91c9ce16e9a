"""Device model, generator and two-stage training on tiny sizes with real ml-100k users."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paramcast.cloud.bundles import generate_parameters
from paramcast.cloud.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.evaluate import evaluate, per_user_metrics
from paramcast.cloud.generator import build_generator
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad, slice_adapters
from paramcast.cloud.train import TrainConfig, split_users, train
from paramcast.common.data import load_interactions
from paramcast.common.interactions import InteractionLog

TINY = dict(hidden=16, head_units=16, ffn_units=12, max_len=20, n_heads=2)
TINY_GEN = {"width": 32, "rank": 2}
TINY_CLOUD = dict(hidden=16, n_blocks=1, n_heads=2, ffn_units=16, max_len=30)


@pytest.fixture(scope="module")
def ml100k(shared_data):
    return load_interactions(shared_data / "ml-100k")


@pytest.fixture(scope="module")
def tiny_checkpoint(ml100k):
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=2, gen_epochs=2, progress=False, threads=1, seed=5)
    return train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, TINY_GEN,
                 cloud_cfg=CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD))


def test_trimmed_padding_computes_the_same_scores(ml100k):
    model = DeviceModel(DeviceModelConfig(n_items=ml100k.n_items, **TINY)).eval()
    hist = [ml100k.sequences[u][:n] for u, n in [(0, 3), (1, 7), (2, 12)]]
    cand = torch.randint(1, ml100k.n_items + 1, (3, 9))
    full = model.score(left_pad(hist, 20), cand)
    trimmed = model.score(left_pad(hist, 20, trim=True), cand)
    assert left_pad(hist, 20, trim=True).shape == (3, 12)
    torch.testing.assert_close(full, trimmed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", ["pre-ln", "sasrec"])
def test_visible_padding_is_attention_over_every_zero_padding_state_of_the_window(ml100k, block):
    """padding_attention="visible" stands for the reference's attention over all max_len positions,
    padding included, at the cost of a trimmed batch: the same states as blocks run over the full
    window with a causal-only mask (padding states zero after every block), on any batch width."""
    from paramcast.cloud.model import sequence_inputs

    torch.manual_seed(1)
    model = DeviceModel(DeviceModelConfig(n_items=ml100k.n_items, **{**TINY, "n_blocks": 2}, block=block,
                                          padding_attention="visible")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # non-zero biases: the padding's key and value matter
    hist = [ml100k.sequences[u][:n] for u, n in [(0, 3), (1, 7), (2, 20), (3, 25)]]
    full = left_pad(hist, 20)
    with torch.no_grad():
        x, keep, _ = sequence_inputs(full, model.item_emb(full), model.pos_emb, model.emb_drop, 20)
        causal_only = torch.where(torch.ones(20, 20, dtype=torch.bool).tril(), 0.0, -1e9)[None, None]
        for b in model.blocks:
            x = b(x, causal_only, None) * keep
        naive = model.ln_f(x)[:, -1]
        visible = model.encode(left_pad(hist, 20, trim=True))[:, -1]
        model.cfg.padding_attention = "masked"
        masked_same_weights = model.encode(full)[:, -1]
    torch.testing.assert_close(visible, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(visible[2:], masked_same_weights[2:], atol=1e-5, rtol=0)  # full windows: no padding
    assert (visible[:2] - masked_same_weights[:2]).abs().max() > 1e-3  # short ones see their padding
    with pytest.raises(ValueError, match="padding attention"):
        sequence_inputs(full, model.item_emb(full), model.pos_emb, model.emb_drop, 20, "sometimes")


def test_slimmed_model_equals_masked_model_and_is_smaller(ml100k):
    torch.manual_seed(0)
    model = DeviceModel(DeviceModelConfig(n_items=ml100k.n_items, **TINY)).eval()
    groups = model.unit_groups()
    keep = {g: torch.randperm(n) < n // 2 for g, n in groups.items()}
    hist = left_pad([ml100k.sequences[u] for u in range(4)], 20)
    cand = torch.randint(1, ml100k.n_items + 1, (4, 11))
    adapters = {s: (torch.randn(4, i, 2), torch.randn(4, 2, o)) for s, (i, o) in model.slot_shapes().items()}
    masks = {g: k.float().expand(4, -1) for g, k in keep.items()}
    small = model.slimmed(keep)
    torch.testing.assert_close(model.score(hist, cand, adapters, masks),
                               small.score(hist, cand, slice_adapters(adapters, keep)), atol=1e-4, rtol=1e-4)
    assert small.n_parameters() < model.n_parameters()
    assert small.head_up.weight.shape == (16, 8)


def tiny_models(ml100k) -> tuple[DeviceModel, CloudModel]:
    torch.manual_seed(0)
    model = DeviceModel(DeviceModelConfig(n_items=ml100k.n_items, **TINY)).eval()
    cloud = CloudModel.for_data(CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD), ml100k.item_features).eval()
    return model, cloud


def test_untrained_generator_reproduces_the_static_model(ml100k):
    model, cloud = tiny_models(ml100k)
    ckpt = Checkpoint("tiny", model, build_generator(model, cloud, **TINY_GEN).eval())
    hist = [ml100k.sequences[u] for u in range(5)]
    adapters, masks = generate_parameters(ckpt, hist, 0.25)
    cand = torch.randint(1, ml100k.n_items + 1, (5, 7))
    assert adapters["head.up"][0].shape == (5, 16, 2) and adapters["head.up"][1].shape == (5, 2, 16)
    torch.testing.assert_close(model.score(left_pad(hist, 20), cand, adapters), model.score(left_pad(hist, 20), cand))
    assert masks is not None
    assert all(m.sum(-1).eq(round(0.25 * m.shape[-1])).all() for m in masks.values())


def test_the_cloud_slot_adds_scores_in_the_cloud_item_space_and_nothing_without_factors(ml100k):
    """head.cloud maps [user state, 1] through A B into the cloud's item space: an item's score gains
    that vector's dot product with the item's cloud vector, and with no factors the model scores as
    before it carried the table."""
    model, cloud = tiny_models(ml100k)
    hist = left_pad([ml100k.sequences[u] for u in range(6)], 20)
    cand = torch.randint(1, ml100k.n_items + 1, (6, 9))
    with torch.no_grad():
        before = model.score(hist, cand)
        model.carry_cloud_items(cloud.output_table())
        assert model.slot_shapes()["head.cloud"] == (16 + 1, 16) and model.user_dim == 32
        torch.testing.assert_close(model.score(hist, cand), before)
        torch.manual_seed(0)
        a, b = torch.randn(6, 17, 3), torch.randn(6, 3, 16)
        user = model.base_state(hist)  # (6, d)
        mapped = torch.einsum("bi,bir,brk->bk", torch.cat([user, torch.ones(6, 1)], 1), a, b)  # (6, k)
        expected = before + (cloud.output_table()[cand] * mapped[:, None, :]).sum(-1)
        torch.testing.assert_close(model.score(hist, cand, {"head.cloud": (a, b)}), expected)
    assert not torch.allclose(expected, before, atol=1e-2)
    # the generator emits the third slot, and an untrained one still reproduces the static model
    ckpt = Checkpoint("tiny", model, build_generator(model, cloud, **TINY_GEN).eval())
    adapters, _ = generate_parameters(ckpt, [ml100k.sequences[u] for u in range(6)])
    assert adapters["head.cloud"][0].shape == (6, 17, 2) and adapters["head.cloud"][1].shape == (6, 2, 16)
    torch.testing.assert_close(model.score(hist, cand, adapters), before)


def test_refinement_moves_generated_deltas_toward_the_cloud_model(ml100k, tiny_checkpoint):
    """refine_steps > 0 (or the refined@K variant) starts from the generator's factors and lowers
    each window's distillation loss against the cloud model; masks are the generator's either way."""
    import torch.nn.functional as F

    from paramcast.cloud.oracle import cloud_log_probs

    ckpt, model = tiny_checkpoint, tiny_checkpoint.device_model.eval()
    windows = [ml100k.sequences[u][: 10 + 7 * u] for u in range(8)]
    teacher = cloud_log_probs(ckpt.generator.encoder, windows)

    def kl(adapters, masks=None):
        with torch.no_grad():
            user = model.user_states(left_pad(windows, 20, trim=True), adapters, masks)[:, -1]
            logp = F.log_softmax((user @ model.output_table().T)[:, 1:], dim=-1)
            return (teacher.exp() * (teacher - logp)).sum(-1)  # (U,)

    assert ckpt.generator.cfg.refine_steps == 0
    generated, masks = generate_parameters(ckpt, windows, 0.5)
    again, _ = generate_parameters(ckpt, windows, 0.5, refine_steps=0)
    refined, refined_masks = generate_parameters(ckpt, windows, 0.5, refine_steps=30)
    torch.testing.assert_close(again, generated)  # 0 steps: the generator's output untouched
    assert all(torch.equal(masks[g], refined_masks[g]) for g in masks)
    before, after = kl(generated, masks), kl(refined, masks)
    assert (after < before).all() and after.mean() < 0.9 * before.mean()
    ckpt.generator.cfg.refine_steps = 30  # the generator's own setting is the default
    try:
        torch.testing.assert_close(generate_parameters(ckpt, windows, 0.5)[0], refined)
    finally:
        ckpt.generator.cfg.refine_steps = 0


def test_held_out_stage_scores_the_validation_users_early_stopping_did_not(ml100k, tiny_checkpoint):
    import copy

    from paramcast.cloud.train import early_stopping_users
    from paramcast.common.errors import InvalidInput
    from paramcast.common.evaluation import LeaveOneOut

    with pytest.raises(InvalidInput, match="stage"):  # every validation user chose the epochs
        evaluate(tiny_checkpoint, ml100k, ["static"], stage="held-out")
    ckpt = copy.copy(tiny_checkpoint)
    ckpt.meta = {**tiny_checkpoint.meta, "train_config": {**tiny_checkpoint.meta["train_config"], "valid_users": 300}}
    report = evaluate(ckpt, ml100k, ["static", "generated", "refined@3"], stage="held-out")
    cold_raw = set(ckpt.meta["split"]["cold_users"])
    warm = np.array([u for u, raw in enumerate(ml100k.user_raw_ids) if raw not in cold_raw])
    eval_users = LeaveOneOut.of(ml100k, warm).eval_users()
    scored = early_stopping_users(eval_users, 300, ckpt.meta["train_config"]["seed"])
    assert len(scored) == 300 and report["static"]["ndcg@10"]["users"] == len(eval_users) - 300
    held = np.setdiff1d(eval_users, scored)
    expected = per_user_metrics(ckpt, ml100k, held, "valid", ["static"])["static"]["ndcg@10"].mean()
    assert report["static"]["ndcg@10"]["value"] == pytest.approx(float(expected))
    assert not any(k.startswith("cold:") for k in report)  # cold users are scored on valid or test as before
    assert {"refined@3-static", "refined@3-generated"} <= set(report)


def test_evaluate_against_a_second_model_pairs_each_variant_both_have(ml100k, tiny_checkpoint):
    """`against`: "<variant>-against" is this model minus the other on the same users and cases; a
    variant the other cannot score is left out, and a model with another split is refused."""
    import copy

    from paramcast.common.errors import InvalidInput

    variants = ["static", "generated"]
    same = evaluate(tiny_checkpoint, ml100k, variants, against=tiny_checkpoint)
    assert same["static-against"]["ndcg@10"]["value"] == 0.0 and same["generated-against"]["ndcg@10"]["ci"] == [0, 0]
    other = copy.deepcopy(tiny_checkpoint)
    other.generator = None
    with torch.no_grad():
        other.device_model.item_emb.weight.mul_(-1.0)  # a different (much worse) static model
    report = evaluate(tiny_checkpoint, ml100k, variants, against=other)
    alone = evaluate(other, ml100k, ["static"])
    for metric in ("hr@10", "ndcg@10"):
        expected = report["static"][metric]["value"] - alone["static"][metric]["value"]
        assert report["static-against"][metric]["value"] == pytest.approx(expected)
    assert report["static-against"]["ndcg@10"]["ci"][0] > 0
    assert "generated-against" not in report  # the other model has no generator
    other.meta = {**other.meta, "split": {**other.meta["split"], "cold_users": []}}
    with pytest.raises(InvalidInput, match="against"):
        evaluate(tiny_checkpoint, ml100k, variants, against=other)


def test_generator_does_not_depend_on_user_identity(ml100k):
    """Two users with the same window get the same delta: conditioning is on the sample only."""
    model, cloud = tiny_models(ml100k)
    ckpt = Checkpoint("tiny", model, build_generator(model, cloud, **TINY_GEN).eval())
    w = ml100k.sequences[0][:10]
    adapters, _ = generate_parameters(ckpt, [w, ml100k.sequences[1], w])
    torch.testing.assert_close(adapters["head.down"][0][0], adapters["head.down"][0][2])


def test_generator_reads_the_long_history_the_device_model_cannot(ml100k):
    """Windows that agree on the device's last max_len items but differ before them get different
    deltas: the cloud encoder sees what the device's window has already dropped."""
    model, cloud = tiny_models(ml100k)
    gen = build_generator(model, cloud, **TINY_GEN).eval()
    with torch.no_grad():
        for head in gen.b_heads.values():
            head.weight.normal_(0, 0.05)
    ckpt = Checkpoint("tiny", model, gen)
    seq = ml100k.sequences[0]
    a, b = seq[:30].copy(), seq[:30].copy()
    b[:5] = ml100k.sequences[1][:5]  # differs only outside the device's 20-item window
    adapters, _ = generate_parameters(ckpt, [a, b])
    assert not torch.allclose(adapters["head.down"][1][0], adapters["head.down"][1][1])


def test_generator_reads_the_cloud_expectation_in_device_item_space(ml100k, tmp_path):
    """The third input is the cloud's next-item distribution averaged over the frozen device item
    table; a generator saved before that input existed still loads, without it."""
    model, cloud = tiny_models(ml100k)
    gen = build_generator(model, cloud, **TINY_GEN).eval()
    torch.testing.assert_close(gen.device_items, model.item_emb.weight.detach())
    window, state = left_pad([ml100k.sequences[0][:25]], 30), torch.zeros(1, 16)
    with torch.no_grad():
        before = gen.context(window, state)
        gen.device_items[1:] += 1.0  # the expectation moves by exactly 1 in every coordinate
        assert not torch.allclose(before, gen.context(window, state))
    plain = build_generator(model, cloud, **TINY_GEN, cloud_expectation=False)
    assert plain.device_items is None and plain.flops_per_bundle() < gen.flops_per_bundle()
    ckpt = Checkpoint("old", model, plain, cloud_model=cloud)
    save_checkpoint(ckpt, tmp_path / "old")
    payload = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    del payload["generator_config"]["cloud_expectation"]  # as written before the input existed
    torch.save(payload, tmp_path / "old" / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "old").generator.cfg.cloud_expectation is False


def test_the_kl_gradient_input_is_the_descent_direction_of_the_distillation_loss(ml100k, tmp_path):
    """`kl_gradient`: the fourth input is -d KL(cloud || device) / d(device user state), checked
    against autograd; it round-trips through a checkpoint, and needs the cloud expectation."""
    import torch.nn.functional as F

    model, cloud = tiny_models(ml100k)
    gen = build_generator(model, cloud, **TINY_GEN, kl_gradient=True).eval()
    window = left_pad([ml100k.sequences[0][:25], ml100k.sequences[1][:30]], 30)
    state = torch.randn(2, 16, requires_grad=True)
    with torch.no_grad():
        got = gen.inputs(window, state)
    d, D = 16, cloud.cfg.hidden
    assert got.shape == (2, gen.cfg.n_inputs) == (2, D + 3 * d)
    with torch.no_grad():
        cloud_logp = F.log_softmax(cloud.encode(window)[:, -1] @ cloud.output_table()[1:].T, dim=-1)
    device_logp = F.log_softmax(state @ model.item_emb.weight[1:].detach().T, dim=-1)
    F.kl_div(device_logp, cloud_logp, log_target=True, reduction="sum").backward()
    torch.testing.assert_close(got[:, -d:], -state.grad, rtol=1e-4, atol=1e-6)
    without = build_generator(model, cloud, **TINY_GEN).eval()
    torch.testing.assert_close(got[:, :D + 2 * d], without.inputs(window, state).detach())  # the rest as before
    save_checkpoint(Checkpoint("klg", model, gen, cloud_model=cloud), tmp_path / "klg")
    assert load_checkpoint(tmp_path / "klg").generator.cfg.kl_gradient is True
    with pytest.raises(ValueError, match="cloud_expectation"):
        build_generator(model, cloud, **TINY_GEN, kl_gradient=True, cloud_expectation=False)


def test_generator_cuts_follow_the_holdout_and_the_cut_range(ml100k):
    """With a holdout of h, both next-item models fit each sequence without its last h items and
    every generator cut lies among them; --gen-cut-from keeps cuts in a sequence's later part."""
    from paramcast.cloud.train import Trainer

    seqs = [s[:42] for s in ml100k.sequences if len(s) >= 42][:30]  # training part: 40 items each
    data = InteractionLog("part", seqs, ml100k.n_items, [str(i) for i in range(len(seqs))], ml100k.item_raw_ids)
    model_cfg = DeviceModelConfig(n_items=data.n_items, **TINY)
    for h, share, lowest in ((3, 0.0, 37), (0, 0.75, 30), (0, 0.0, 1)):
        cfg = TrainConfig(gen_holdout=h, gen_cut_from=share, gen_batch_size=8, progress=False, threads=1,
                          cold_fraction=0.0, gen_staleness=0)  # the window ends at the cut
        trainer = Trainer(data, model_cfg, {}, cfg, None)
        assert {len(s) for s in trainer.train_seqs} == {40}
        assert {len(s) for s in trainer.fit_seqs} == {40 - h}
        cuts = [int(row.count_nonzero()) for batch in trainer._generator_batches(100, 100) for row in batch[0]]
        assert min(cuts) >= lowest and max(cuts) <= 39
        if lowest == 1:
            assert min(cuts) < 30  # without a range, cuts reach a sequence's first part


def test_generator_windows_are_up_to_the_staleness_older_than_the_positions_they_serve(ml100k):
    """--gen-staleness N: a delta's window ends up to N interactions before the cut its loss starts
    at, so the inputs its loss runs on (here in the cloud's width, which cuts none of these short
    sequences) extend at most horizon - 1 + N items past it (horizon - 1 without)."""
    from paramcast.cloud.train import Trainer

    seqs = [s[:42] for s in ml100k.sequences if len(s) >= 42][:30]
    data = InteractionLog("part", seqs, ml100k.n_items, [str(i) for i in range(len(seqs))], ml100k.item_raw_ids)
    gaps = {}
    for stale in (0, 20):
        cfg = TrainConfig(gen_staleness=stale, gen_cuts=8, gen_batch_size=8, progress=False, threads=1,
                          cold_fraction=0.0)
        trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {}, cfg, None)
        gaps[stale] = [int(inp.count_nonzero() - win.count_nonzero()) for batch in trainer._generator_batches(100, 100)
                       for win, inp in zip(batch[0], batch[3], strict=True)]
    assert min(gaps[0]) >= 0 and max(gaps[0]) <= cfg.horizon - 1
    assert max(gaps[20]) <= cfg.horizon - 1 + 20 and max(gaps[20]) > cfg.horizon + 5


def test_generator_users_are_kept_out_of_the_cloud_stage(ml100k):
    """--gen-users: a share of the warm users is fitted by the device model only; the cloud model
    never sees their sequences and the generator's cuts come from them alone."""
    from paramcast.cloud.train import Trainer

    seqs = [s[:42] for s in ml100k.sequences if len(s) >= 42][:40]
    data = InteractionLog("part", seqs, ml100k.n_items, [str(i) for i in range(len(seqs))], ml100k.item_raw_ids)
    cfg = TrainConfig(gen_users=0.25, gen_batch_size=8, progress=False, threads=1, cold_fraction=0.0,
                      gen_staleness=0)
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {}, cfg, None)
    key = {tuple(s) for s in trainer.train_seqs}.__contains__
    gen, cloud = {tuple(s) for s in trainer.gen_seqs}, {tuple(s) for s in trainer.cloud_seqs}
    assert len(gen) == 10 and len(cloud) == 30 and not gen & cloud and all(map(key, gen | cloud))
    assert trainer.fit_seqs == trainer.train_seqs  # the device model still fits every warm user
    starts = {tuple(row[row > 0][:3].tolist()) for batch in trainer._generator_batches(100, 100) for row in batch[0]}
    assert starts <= {s[:3] for s in gen}


def test_a_stale_delta_older_than_the_history_is_no_delta(ml100k):
    """stale@k for a history of k items or fewer: the device held no bundle k interactions ago, so
    it scores with the base model; a longer history gets the delta generated k items back."""
    from paramcast.cloud.evaluate import user_vectors

    model, cloud = tiny_models(ml100k)
    gen = build_generator(model, cloud, **TINY_GEN).eval()
    with torch.no_grad():
        for head in gen.b_heads.values():
            head.weight.normal_(0, 0.05)
    ckpt = Checkpoint("tiny", model, gen, cloud_model=cloud)
    short, long = ml100k.sequences[0][:4], ml100k.sequences[1][:30]
    static = user_vectors(ckpt, [short, long], "static")
    stale = user_vectors(ckpt, [short, long], "stale@5")
    torch.testing.assert_close(stale[0], static[0])
    assert not torch.allclose(stale[1], static[1])


def test_cloud_model_uses_item_side_features(ml100k):
    """Two items with the same embedding but different genres get different vectors."""
    _, cloud = tiny_models(ml100k)
    genres = ml100k.item_features["genres"]
    i, j = 1, next(j for j in range(2, ml100k.n_items + 1) if (genres[j] != genres[1]).any())
    with torch.no_grad():
        cloud.item_emb.weight[j] = cloud.item_emb.weight[i]
    v = cloud.item_vectors(torch.tensor([i, j]))
    assert cloud.cfg.features["genres"] == [int(genres.sum(1).max()), 19]
    assert not torch.allclose(v[0], v[1])


def test_a_cloud_model_that_reads_user_features_needs_their_profile_and_is_moved_by_it(ml100k):
    """--user-features: the profile's codes change the states, a missing profile is an error that
    names the features, and codes past the trained vocabulary read as unknown."""
    torch.manual_seed(0)
    cloud = CloudModel.for_data(CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD), ml100k.item_features,
                                ml100k.user_features).eval()
    assert cloud.cfg.user_features == {"age": 7, "gender": 2, "occupation": 21, "region": 19}
    seq = left_pad([ml100k.sequences[0][:10]] * 2, 30)
    profile = cloud.profiles(ml100k.user_features, np.array([0, 1]))  # users 1 and 2 differ in every column
    assert profile.shape == (2, 4) and (profile[0] != profile[1]).all()
    with torch.no_grad():
        states = cloud.encode(seq, profile)[:, -1]
        same = cloud.encode(seq, profile[[0, 0]])[:, -1]
    assert not torch.allclose(states[0], states[1]) and torch.allclose(same[0], same[1])
    torch.testing.assert_close(same[0], states[0])
    with pytest.raises(ValueError, match="age"):
        cloud.encode(seq)
    later = {k: v.copy() for k, v in ml100k.user_features.items()}
    later["occupation"][0] = 99  # a code this model was not trained on
    assert cloud.profiles(later, np.array([0]))[0, 2] == 0
    with pytest.raises(ValueError, match="region"):
        cloud.profiles({k: v for k, v in ml100k.user_features.items() if k != "region"}, np.array([0]))
    plain = CloudModel.for_data(CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD), ml100k.item_features)
    assert plain.cfg.user_features == {} and plain.profiles(ml100k.user_features, np.array([0])) is None


@pytest.mark.parametrize("flags", [{}, {"gen_holdout": 2}, {"gen_users": 0.25}])
def test_each_training_row_carries_its_own_users_profile(ml100k, flags):
    """The profile beside a sequence in a cloud batch is that sequence's user's, whatever the
    holdout or the generator's share of users drops or trims."""
    from paramcast.cloud.train import Trainer

    cfg = TrainConfig(progress=False, threads=1, user_features=True, **flags)
    trainer = Trainer(ml100k, DeviceModelConfig(n_items=ml100k.n_items, **TINY), {}, cfg, None)
    cloud = CloudModel.for_data(CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD), {}, ml100k.user_features)
    profiles = cloud.profiles(ml100k.user_features, trainer.cloud_users)
    split = trainer.split
    owner = {}
    for u in trainer.cloud_users:
        full = split.train_sequence(int(u))
        owner[tuple(full[: len(full) - flags.get("gen_holdout", 0)][-31:].tolist())] = int(u)
    rows = 0
    for _, _, own, profile in trainer._sequence_batches(trainer.cloud_seqs, 30, 64, profiles):
        for row, p in zip(own, profile, strict=True):
            user = owner[tuple(row[row > 0].tolist())]
            assert p.tolist() == [int(ml100k.user_features[f][user]) for f in cloud.cfg.user_features]
            rows += 1
    assert rows == len(trainer.cloud_seqs) == len(trainer.cloud_users)


def test_user_features_train_the_cloud_model_as_an_upper_bound_that_is_never_distilled(tmp_path, ml100k, shared_data,
                                                                                      capsys):
    """The cloud stage learns the profile embeddings, the checkpoint keeps them, `cloud` evaluates
    with each user's profile; the generator stage and the variants built on it refuse such a model."""
    from paramcast.cli import main
    from paramcast.cloud.evaluate import user_vectors

    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=1, progress=False, threads=1, seed=5, user_features=True)
    ckpt = train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, stages=("static", "cloud"),
                 cloud_cfg=CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD))
    untrained = CloudModel.for_data(CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD), ml100k.item_features,
                                    ml100k.user_features)
    assert not torch.allclose(ckpt.cloud_model.user_emb["occupation"].weight, untrained.user_emb["occupation"].weight)
    save_checkpoint(ckpt, tmp_path / "u")
    loaded = load_checkpoint(tmp_path / "u")
    torch.testing.assert_close(loaded.cloud_model.user_emb["age"].weight, ckpt.cloud_model.user_emb["age"].weight)
    scores = per_user_metrics(loaded, ml100k, np.arange(40), "valid", ["cloud"])["cloud"]["ndcg@10"]
    assert len(scores) == 40 and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="only static and cloud"):
        user_vectors(loaded, [ml100k.sequences[0][:5]], "stale@5")
    with pytest.raises(ValueError, match="cannot be distilled"):
        train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, start=loaded,
              stages=("generator",))
    with pytest.raises(ValueError, match="has none"):
        train(InteractionLog("bare", ml100k.sequences[:50], ml100k.n_items, ml100k.user_raw_ids[:50],
                             ml100k.item_raw_ids), "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg,
              stages=("static", "cloud"), cloud_cfg=CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD))
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(tmp_path / "x"),
                 "--user-features", "--epochs", "1"]) == 2
    assert "--user-features" in capsys.readouterr().err
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(tmp_path / "y"),
                 "--start", str(tmp_path / "u"), "--stages", "generator"]) == 2
    assert "--start" in capsys.readouterr().err


def test_cold_users_are_held_out_of_training(ml100k):
    warm, cold = split_users(ml100k, 0.1, seed=1)
    assert len(cold) == round(0.1 * ml100k.n_users)
    assert not set(warm) & set(cold) and len(warm) + len(cold) == ml100k.n_users


def test_training_is_reproducible_for_a_seed(ml100k, tiny_checkpoint):
    cfg = TrainConfig(epochs=2, gen_epochs=2, progress=False, threads=1, seed=5)
    again = train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, TINY_GEN,
                  cloud_cfg=CloudModelConfig(n_items=ml100k.n_items, **TINY_CLOUD))
    assert again.base_version == tiny_checkpoint.base_version
    reference = tiny_checkpoint.generator.state_dict()
    for k, a in again.generator.state_dict().items():
        assert torch.equal(a, reference[k]), k


def test_checkpoint_round_trip_and_report_layout(tmp_path, ml100k, tiny_checkpoint):
    save_checkpoint(tiny_checkpoint, tmp_path / "b")
    loaded = load_checkpoint(tmp_path / "b")
    assert loaded.base_version == tiny_checkpoint.base_version and loaded.model_id == "sasrec-ml-100k"
    info = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert info["device_config"]["hidden"] == 16 and info["generator_config"]["rank"] == 2
    assert len(info["meta"]["split"]["cold_users"]) == round(0.1 * ml100k.n_users)
    report = evaluate(loaded, ml100k, ["static", "generated", "slimmed@0.5", "stale@5", "int8"])
    for key in ("static", "generated", "slimmed@0.5", "stale@5", "int8", "generated-static", "stale@5-static",
                "cold:static", "cold:generated", "cold:generated-static"):
        assert set(report[key]) >= {"hr@10", "ndcg@10", "auc"}, key
        lo, hi = report[key]["ndcg@10"]["ci"]
        assert lo <= report[key]["ndcg@10"]["value"] <= hi
    warm_users = report["static"]["ndcg@10"]["users"]
    cold_users = report["cold:static"]["ndcg@10"]["users"]
    assert warm_users + cold_users == int((ml100k.lengths() >= 3).sum())


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    from paramcast.common.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint(tiny_checkpoint, tmp_path / "b")
    payload = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    payload["device_state"]["item_emb.weight"][3, 0] += 1.0
    torch.save(payload, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ModelNotFound, match="base version"):
        load_checkpoint(tmp_path / "b")


def test_directories_written_under_the_old_file_name_still_load(tmp_path, tiny_checkpoint):
    save_checkpoint(tiny_checkpoint, tmp_path / "b")
    (tmp_path / "b" / "checkpoint.pt").rename(tmp_path / "b" / "bundle.pt")
    loaded = load_checkpoint(tmp_path / "b")
    assert (loaded.model_id, loaded.base_version) == (tiny_checkpoint.model_id, tiny_checkpoint.base_version)


def test_train_and_evaluate_cli(tmp_path, shared_data, capsys):
    from paramcast.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(out), "--epochs", "1",
                 "--gen-epochs", "1", "--hidden", "16", "--head-units", "16", "--ffn-units", "16", "--max-len", "20",
                 "--window", "30", "--cloud-hidden", "16", "--cloud-blocks", "1", "--cloud-ffn-units", "16",
                 "--cloud-block", "sasrec", "--gen-width", "32", "--threads", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert load_checkpoint(out).cloud_model.blocks[0].sasrec  # --cloud-block reaches the cloud model
    # rank 4: head.up and head.down (16 x 16 each), head.cloud ((16 + 1) -> the cloud's 16)
    assert summary["generated_parameters_per_device"] == 4 * (16 + 16) * 2 + 4 * (16 + 1 + 16)
    assert summary["cloud_flops_per_request"] > 0 and summary["cloud_parameters"] > 0
    assert main(["evaluate", "--model", str(out), "--data", str(shared_data / "ml-100k"), "--json",
                 "--variants", "static,generated,cloud,oracle"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("cloud", "cloud-static", "gap_closed", "oracle"):
        assert np.isfinite(report[key]["ndcg@10"]["value"]), key
    assert 0.0 <= report["static"]["hr@10"]["value"] <= 1.0
    assert main(["evaluate", "--model", str(out), "--data", str(shared_data / "amazon-beauty")]) == 2
    assert "items" in capsys.readouterr().err
    assert np.isfinite(report["generated-static"]["ndcg@10"]["value"])
    # --refine-steps changes every generated variant; refined@0 is the generator's output itself
    assert main(["evaluate", "--model", str(out), "--data", str(shared_data / "ml-100k"), "--json",
                 "--variants", "static,generated,refined@0", "--refine-steps", "5"]) == 0
    refined = json.loads(capsys.readouterr().out)
    assert refined["refined@0"]["ndcg@10"]["value"] == report["generated"]["ndcg@10"]["value"]
    assert refined["generated"]["ndcg@10"]["value"] != report["generated"]["ndcg@10"]["value"]
    assert main(["evaluate", "--model", str(out), "--data", str(shared_data / "ml-100k"), "--refine-steps", "-1"]) == 2
    assert "--refine-steps" in capsys.readouterr().err


def test_generator_retrained_from_a_checkpoint_keeps_the_base_version(tmp_path, ml100k, tiny_checkpoint):
    """`--start DIR --stages generator`: the device and cloud models are kept as they are, so devices
    holding the package stay valid, and only the generator is trained again."""
    save_checkpoint(tiny_checkpoint, tmp_path / "base")
    start = load_checkpoint(tmp_path / "base")
    cfg = TrainConfig(epochs=1, gen_epochs=1, progress=False, threads=1, seed=9)
    again = train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, TINY_GEN,
                  stages=("generator",), start=start)
    assert again.base_version == tiny_checkpoint.base_version
    assert again.cloud_model is start.cloud_model
    assert set(again.meta["history"]) >= {"static", "cloud", "generator"}
    with pytest.raises(ValueError, match="cloud"):
        train(ml100k, "unused", DeviceModelConfig(n_items=ml100k.n_items, **TINY), cfg, TINY_GEN,
              stages=("generator",), start=Checkpoint("x", start.device_model))


def test_embedding_initialisations():
    scaled = DeviceModel(DeviceModelConfig(n_items=3000, hidden=50, max_len=200))
    xavier = DeviceModel(DeviceModelConfig(n_items=3000, hidden=50, max_len=200, init="xavier"))
    assert float(scaled.item_emb.weight[1:].detach().std()) == pytest.approx(50**-0.5, rel=0.05)
    assert float(xavier.item_emb.weight[1:].detach().std()) == pytest.approx((2 / (3001 + 50)) ** 0.5, rel=0.05)
    assert float(xavier.pos_emb.weight.detach().std()) == pytest.approx((2 / (200 + 50)) ** 0.5, rel=0.1)
    assert not xavier.item_emb.weight[0].any()  # padding stays zero
    ref = DeviceModel(DeviceModelConfig(n_items=3000, hidden=50, max_len=200, ffn_units=50, init="reference"))
    assert float(ref.item_emb.weight[1:].detach().std()) == pytest.approx((2 / (3001 + 50)) ** 0.5, rel=0.05)
    qkv = ref.blocks[0].qkv.weight.detach()  # (150, 50): every matrix, not only the embeddings
    assert float(qkv.std()) == pytest.approx((2 / (150 + 50)) ** 0.5, rel=0.1)
    assert float(xavier.blocks[0].qkv.weight.detach().std()) == pytest.approx(150**-0.5, rel=0.1)  # nn.Linear's
    assert not ref.item_emb.weight[0].any() and torch.equal(ref.ln_f.weight, torch.ones(50))
    with pytest.raises(ValueError, match="unknown init"):
        DeviceModel(DeviceModelConfig(n_items=10, init="orthogonal"))

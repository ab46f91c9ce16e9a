"""Training loop and presets: early stopping in epochs keeps the best weights; the preset follows a rule."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from paramcast.cloud.model import DeviceModelConfig
from paramcast.cloud.presets import DENSE_MEDIAN_LENGTH, preset, sequence_regime
from paramcast.cloud.train import TrainConfig, Trainer
from paramcast.common.data import load_interactions
from paramcast.common.interactions import InteractionLog

TINY = dict(hidden=16, head_units=16, ffn_units=12, max_len=20, n_heads=2)


@pytest.fixture(scope="module")
def ml100k(shared_data):
    return load_interactions(shared_data / "ml-100k")


def log_of(name: str, lengths: list[int], n_items: int = 500) -> InteractionLog:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, n_items + 1, size=n) for n in lengths]
    return InteractionLog(name, seqs, n_items, [str(i) for i in range(len(seqs))],
                          [""] + [str(i) for i in range(1, n_items + 1)])


def test_preset_follows_the_median_sequence_length_not_the_dataset_name(ml100k):
    assert sequence_regime(ml100k)["dense"] and preset("sasrec-reference", ml100k)[0]["max_len"] == 200
    short = log_of("ml-100k", [5, 6, 6, 7, 40])  # named like the dense log, but sparse
    model, training = preset("sasrec-reference", short)
    assert (model["max_len"], model["dropout"]) == (50, 0.5)
    long = log_of("amazon-beauty", [DENSE_MEDIAN_LENGTH] * 3 + [3, 4])
    model, _ = preset("sasrec-reference", long)
    assert (model["max_len"], model["dropout"]) == (200, 0.2)
    assert (model["hidden"], model["n_blocks"], model["n_heads"], model["block"]) == (50, 2, 1, "sasrec")
    assert {k: training[k] for k in ("lr", "batch_size", "cold_fraction", "slim_train_prob")} == {
        "lr": 1e-3, "batch_size": 128, "cold_fraction": 0.0, "slim_train_prob": 0.0}
    assert training["patience"] > training["eval_every"]  # patience counts epochs, several validations
    with pytest.raises(ValueError, match="unknown preset"):
        preset("bert4rec", short)


def test_preset_sets_its_loss_unless_one_is_given(ml100k):
    from paramcast.cli import build_parser
    from paramcast.cloud.presets import DEFAULT_LOSS, PRESET_LOSS
    from paramcast.commands.train import apply_preset

    def parsed(*flags: str):
        args = build_parser().parse_args(["train", "--data", "x", "--out", "y", *flags])
        apply_preset(args, ml100k)
        return args

    assert parsed("--preset", "sasrec-reference").loss == PRESET_LOSS
    assert parsed("--preset", "sasrec-reference", "--loss", "bce").loss == "bce"
    assert parsed().loss == "auto" and TrainConfig(loss="auto").loss_config(ml100k.n_items).name == DEFAULT_LOSS


def test_the_cloud_models_dropout_follows_the_sequence_regime_unless_given(ml100k):
    from paramcast.cli import build_parser
    from paramcast.commands.train import apply_preset

    def cloud_dropout(data, *flags: str) -> float:
        args = build_parser().parse_args(["train", "--data", "x", "--out", "y", *flags])
        apply_preset(args, data)
        return args.cloud_dropout

    sparse = log_of("ml-100k", [5, 6, 6, 7, 40])
    assert cloud_dropout(ml100k) == 0.2 and cloud_dropout(sparse) == 0.5
    assert cloud_dropout(sparse, "--cloud-dropout", "0.1") == 0.1


def test_early_stopping_counts_epochs_and_keeps_the_best_weights(ml100k):
    data = InteractionLog("part", ml100k.sequences[:60], ml100k.n_items, ml100k.user_raw_ids[:60],
                          ml100k.item_raw_ids)
    scripted = iter([0.10, 0.30, 0.20, 0.25, 0.90])  # validations at epochs 2, 4, 6, 8 (10 never runs)
    seen: list[dict] = []

    def evaluator(ckpt, data, users, stage, variants, protocol):
        assert stage == "valid" and protocol == "both"
        seen.append(copy.deepcopy(ckpt.device_model.state_dict()))
        score = next(scripted)
        return {v: {"ndcg@10": np.full(len(users), score), "full:ndcg@10": np.full(len(users), score / 10)}
                for v in variants}

    cfg = TrainConfig(epochs=40, patience=4, eval_every=2, warmup_epochs=0, progress=False, threads=1, seed=3,
                      loss="bce", cold_fraction=0.0)
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {}, cfg, evaluator)
    model = trainer.train_static()
    history = trainer.history["static"]
    assert len(history) == 8 and len(seen) == 4  # stopped 4 epochs after the best (epoch 4)
    assert [h["epoch"] for h in history if "valid_ndcg@10" in h] == [2, 4, 6, 8]
    assert history[3]["valid_full:ndcg@10"] == pytest.approx(0.03)
    assert trainer.best_epoch["static"] == 4
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, seen[1][name])  # the epoch-4 weights, not the last ones
    assert any(not torch.equal(seen[1][n], seen[3][n]) for n in seen[1])  # training did move on


def test_patience_counts_from_the_warmup_when_the_best_epoch_is_earlier(ml100k):
    """A model on the popularity plateau whose best early epoch is noise is not stopped before the
    warm-up ends plus the patience; a best epoch after the warm-up stops it as before."""
    data = InteractionLog("part", ml100k.sequences[:60], ml100k.n_items, ml100k.user_raw_ids[:60],
                          ml100k.item_raw_ids)

    def run(scores: list[float], warmup: int) -> Trainer:
        scripted = iter(scores)

        def evaluator(ckpt, data, users, stage, variants, protocol):
            score = next(scripted)
            return {v: {"ndcg@10": np.full(len(users), score), "full:ndcg@10": np.full(len(users), score)}
                    for v in variants}

        cfg = TrainConfig(epochs=40, patience=3, warmup_epochs=warmup, progress=False, threads=1, seed=3,
                          loss="bce", cold_fraction=0.0)
        trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {}, cfg, evaluator)
        trainer.train_static()
        return trainer

    plateau = [0.24, 0.25, 0.23, 0.24, 0.22, 0.23, 0.24, 0.22, 0.5, 0.6] + [0.1] * 30
    without = run(plateau, 0)
    assert len(without.history["static"]) == 5 and without.best_epoch["static"] == 2  # stopped on the plateau
    warmed = run(plateau, 6)
    assert len(warmed.history["static"]) == 13 and warmed.best_epoch["static"] == 10  # left it, stopped 3 after
    assert len(run([0.1 * k for k in range(1, 9)] + [0.0] * 32, 6).history["static"]) == 11  # best 8 > 6: as before


def test_the_cloud_stage_has_its_own_patience_when_given(ml100k):
    from paramcast.cloud.cloud_model import CloudModelConfig
    from paramcast.cloud.model import DeviceModel

    data = InteractionLog("part", ml100k.sequences[:60], ml100k.n_items, ml100k.user_raw_ids[:60],
                          ml100k.item_raw_ids)

    def stopped_after(**patience) -> int:
        scores = iter([0.5] + [0.1] * 40)  # best at epoch 1, never better again

        def evaluator(ckpt, data, users, stage, variants, protocol):
            score = next(scores)
            return {v: {"ndcg@10": np.full(len(users), score), "full:ndcg@10": np.full(len(users), score)}
                    for v in variants}

        cfg = TrainConfig(epochs=40, warmup_epochs=0, progress=False, threads=1, seed=3, cold_fraction=0.0,
                          **patience)
        trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {}, cfg, evaluator)
        trainer.train_cloud(DeviceModel(trainer.model_cfg),
                            CloudModelConfig(n_items=data.n_items, hidden=16, n_blocks=1, ffn_units=16, max_len=20))
        return len(trainer.history["cloud"])

    assert stopped_after(patience=2) == 3  # the cloud stage follows --patience unless given its own
    assert stopped_after(patience=2, cloud_patience=6) == 7


def test_the_plateau_schedule_decays_the_rate_after_epochs_without_a_better_validation(ml100k):
    """`lr_decay`: the rate drops by the factor once `lr_decay_after` epochs pass without a better
    validation score, the count starting again from each decay and from each new best."""
    data = InteractionLog("part", ml100k.sequences[:20], ml100k.n_items, ml100k.user_raw_ids[:20],
                          ml100k.item_raw_ids)
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {},
                      TrainConfig(progress=False, threads=1, cold_fraction=0.0), None)
    layer = torch.nn.Linear(3, 2)
    rates: list[float] = []  # the learning rate each epoch's step ran at
    opt_seen: list[torch.optim.Optimizer] = []
    real_adam = torch.optim.Adam

    def adam(*args, **kwargs):
        opt_seen.append(real_adam(*args, **kwargs))
        return opt_seen[-1]

    scores = iter([1.0, 0.5, 0.5, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5])  # the best at epochs 1 and 4

    def step(i):
        rates.append(opt_seen[0].param_groups[0]["lr"])
        return layer(torch.ones(1, 3)).sum()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim, "Adam", adam)
        trainer._fit("static", layer, list(layer.parameters()), 0.1, lambda: iter(range(1)), 1, step, 9, 100,
                     lambda: {"select": next(scores)}, lambda on: None, lr_decay=0.5, lr_decay_after=2)
    # epochs 2-3 without a better score: decay after 3; a new best at 4; 5-6: decay after 6; 7-8: after 8
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.0125])
    assert [h.get("lr") for h in trainer.history["static"]] == [None, None, 0.05, None, None, 0.025, None, 0.0125,
                                                                None]


def test_the_cosine_schedule_follows_half_a_cosine_over_the_epoch_budget_and_resumes_on_it(ml100k, tmp_path):
    """`lr_schedule="cosine"`: step s of S (S = epochs x batches) runs at lr (1 + cos(pi s / S)) / 2,
    whatever the validation scores; a stage resumed after an interruption continues on the same curve."""
    data = InteractionLog("part", ml100k.sequences[:20], ml100k.n_items, ml100k.user_raw_ids[:20],
                          ml100k.item_raw_ids)
    real_adam = torch.optim.Adam

    def run(epochs: int, stop_after: int | None = None) -> list[float]:
        trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {},
                          TrainConfig(progress=False, threads=1, cold_fraction=0.0), None)
        trainer.progress_dir = tmp_path
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 2)
        rates: list[float] = []
        opts: list[torch.optim.Optimizer] = []

        def adam(*args, **kwargs):
            opts.append(real_adam(*args, **kwargs))
            return opts[-1]

        def step(i):
            if stop_after is not None and len(rates) == stop_after:
                raise KeyboardInterrupt  # interrupted after stop_after steps (epoch 2's validation saved)
            rates.append(opts[0].param_groups[0]["lr"])
            return layer(torch.ones(1, 3)).sum()

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.optim, "Adam", adam)
            try:
                trainer._fit("static", layer, list(layer.parameters()), 0.1, lambda: iter(range(2)), 2, step,
                             epochs, 100, lambda: {"select": 0.5}, lambda on: None, resume_key={"m": 1},
                             lr_schedule="cosine")
            except KeyboardInterrupt:
                pass
        return rates

    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]  # 4 epochs of 2 batches
    assert run(4) == pytest.approx(expected)
    assert run(4, stop_after=4) == pytest.approx(expected[:4])  # two epochs, then interrupted
    assert run(4) == pytest.approx(expected[4:])  # resumed at epoch 3: the curve goes on
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {},
                      TrainConfig(progress=False, threads=1, cold_fraction=0.0), None)
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="schedule 'linear'"):
        trainer._fit("static", layer, list(layer.parameters()), 0.1, lambda: iter(range(2)), 2,
                     lambda i: layer(torch.ones(1, 3)).sum(), 4, 100, lambda: {"select": 0.5}, lambda on: None,
                     lr_schedule="linear")


def test_a_moving_average_is_validated_and_kept_while_training_goes_on_from_the_last_weights(ml100k):
    """`ema`: validation sees (and early stopping keeps) the exponential moving average of the
    weights after every step, and the next epoch continues from the last step's weights."""
    data = InteractionLog("part", ml100k.sequences[:20], ml100k.n_items, ml100k.user_raw_ids[:20],
                          ml100k.item_raw_ids)
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {},
                      TrainConfig(progress=False, threads=1, cold_fraction=0.0), None)
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    at_step: list[torch.Tensor] = []  # the weights each step starts from
    validated: list[torch.Tensor] = []
    scores = iter([0.0, 1.0, 0.5])  # before training, epoch 1 (the best), epoch 2

    def step(i):
        at_step.append(layer.weight.detach().clone())
        return ((layer(x[i:i + 1]) - 1.0) ** 2).sum()

    def validate():
        validated.append(layer.weight.detach().clone())
        return {"select": next(scores)}

    trainer._fit("generator", layer, list(layer.parameters()), 0.1, lambda: iter(range(4)), 4, step, 2, 5,
                 validate, lambda on: None, ema=0.5)
    after = at_step[1:5]  # the weights after each of epoch 1's four steps
    average = after[0]
    for w in after[1:]:
        average = 0.5 * average + 0.5 * w
    torch.testing.assert_close(validated[1], average)
    assert not torch.allclose(after[-1], average)  # so epoch 2 started from the last weights, not the average
    torch.testing.assert_close(layer.weight.detach(), average)  # the best validation's state is kept


def test_preset_cli_lets_explicit_flags_win_and_evaluate_reports_both_protocols(tmp_path, shared_data, capsys):
    from paramcast.cli import main
    from paramcast.cloud.presets import PRESET_LOSS

    out = tmp_path / "m"
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(out), "--preset", "sasrec-reference",
                 "--stages", "static", "--epochs", "1", "--hidden", "16", "--ffn-units", "16", "--head-units", "16",
                 "--max-len", "20", "--threads", "1", "--no-progress"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "checkpoint.json").read_text())
    cfg = meta["device_config"]
    assert (cfg["hidden"], cfg["max_len"]) == (16, 20)  # explicit flags
    assert (cfg["n_blocks"], cfg["n_heads"], cfg["dropout"], cfg["block"]) == (2, 1, 0.2, "sasrec")  # the preset
    train_cfg = meta["meta"]["train_config"]
    assert (train_cfg["cold_fraction"], train_cfg["slim_train_prob"], train_cfg["lr"]) == (0.0, 0.0, 1e-3)
    assert meta["meta"]["split"]["cold_users"] == []
    assert meta["meta"]["loss"]["name"] == PRESET_LOSS  # the preset's validated loss when --loss is not given
    assert meta["meta"]["preset"]["rule"]["dense"] is True

    def report(*extra: str) -> dict:
        assert main(["evaluate", "--model", str(out), "--data", str(shared_data / "ml-100k"), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["static"]

    sampled, both, full = report(), report("--protocol", "both"), report("--full-ranking")
    assert set(both) == set(sampled) | {"full:hr@10", "full:ndcg@10", "full:mrr"}
    assert both["ndcg@10"] == sampled["ndcg@10"]
    assert set(full) == {"full:hr@10", "full:ndcg@10", "full:mrr"} and full["full:mrr"] == both["full:mrr"]
    assert both["full:ndcg@10"]["value"] < both["ndcg@10"]["value"]  # the whole catalogue is harder than 100


@pytest.mark.parametrize("ema", [0.0, 0.9])  # with a moving average, the average is resumed too
def test_an_interrupted_stage_resumes_to_the_same_model(ml100k, tmp_path, ema):
    data = InteractionLog("part", ml100k.sequences[:40], ml100k.n_items, ml100k.user_raw_ids[:40],
                          ml100k.item_raw_ids)
    model_cfg = DeviceModelConfig(n_items=data.n_items, **TINY)

    class Interrupted(Exception):
        pass

    def evaluator(stop_after: int | None):
        calls = iter(range(100))

        def evaluate(ckpt, data, users, stage, variants, protocol):
            if next(calls) == stop_after:
                raise Interrupted  # as if the process were killed during the second validation
            score = float(ckpt.device_model.item_emb.weight[1:5].detach().sum())  # depends on the weights
            return {v: {"ndcg@10": np.full(len(users), score), "full:ndcg@10": np.zeros(len(users))} for v in variants}
        return evaluate

    cfg = TrainConfig(epochs=6, patience=100, eval_every=2, progress=False, threads=1, seed=4, loss="bce",
                      cold_fraction=0.0, ema=ema)
    whole = Trainer(data, model_cfg, {}, cfg, evaluator(None))
    expected = whole.train_static().state_dict()
    progress = tmp_path / "static-progress.pt"  # the static stage's file in the progress folder
    with pytest.raises(Interrupted):
        Trainer(data, model_cfg, {}, cfg, evaluator(1), tmp_path).train_static()
    assert progress.exists()  # saved after the first validation (epoch 2)
    resumed = Trainer(data, model_cfg, {}, cfg, evaluator(None), tmp_path)
    got = resumed.train_static().state_dict()
    assert [h["epoch"] for h in resumed.history["static"]] == list(range(1, 7))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)
    assert not progress.exists()  # a finished stage leaves nothing to resume
    with pytest.raises(Interrupted):
        Trainer(data, model_cfg, {}, cfg, evaluator(1), tmp_path).train_static()
    other = Trainer(data, model_cfg, {}, TrainConfig(**{**cfg.to_dict(), "lr": 5e-3}), evaluator(None), tmp_path)
    other.train_static()
    assert other.history["static"][0]["epoch"] == 1  # saved under other settings: started afresh


def test_popularity_baseline_ranks_by_training_counts():
    from paramcast.cloud.evaluate import popularity_metrics

    # Item 1 is everyone's favourite in training; user 0's test target is item 1, user 1's is item 9.
    seqs = [np.array([1, 2, 3, 1]), np.array([1, 4, 5, 9]), np.array([1, 6, 7, 8])]
    n_items = 120
    data = InteractionLog("tiny", seqs, n_items, ["a", "b", "c"], [""] + [str(i) for i in range(1, n_items + 1)])
    m = popularity_metrics(data, np.arange(3), "test", protocol="both")
    # The most trained-on item ranks first; that user 0 saw it before does not exclude it as the target.
    assert m["full:hr@10"][0] == 1.0 and m["hr@10"][0] == 1.0
    assert m["full:mrr"][1] < 0.2  # item 9 never appears in training: it ties with the unseen tail


def test_reference_loss_choice_uses_validation_only():
    from paramcast.bench_reference import choose

    def run(loss, hr, ndcg, full, test_full=0.0):
        return {"loss": loss, "valid": {"sampled": {"hr@10": hr, "ndcg@10": ndcg}, "full": {"ndcg@10": full}},
                "full": {"ndcg@10": test_full}}

    # gbce matches bce's sampled NDCG@10 with a lower HR@10 and twice its full-ranking NDCG@10: it wins.
    # sampled has the best full ranking but a lower sampled NDCG@10 than bce: it does not qualify.
    results = [run("bce", 0.48, 0.324, 0.028), run("gbce", 0.46, 0.326, 0.057), run("sampled", 0.47, 0.320, 0.090),
               run("ce", 0.45, 0.330, 0.050, test_full=0.9)]  # test figures never choose
    assert choose(results) == ("gbce", ["bce", "gbce", "ce"])
    assert choose(results[2:]) == ("sampled", ["sampled", "ce"])  # without the reference loss every loss qualifies


@pytest.mark.parametrize("extra", [["--gen-users", "1.5", "--stages", "static,cloud"],
                                   ["--gen-users", "0.2", "--stages", "static"]])
def test_a_generator_user_share_outside_its_range_or_without_a_cloud_stage_is_refused(tmp_path, shared_data,
                                                                                      capsys, extra):
    from paramcast.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(out), *extra, "--no-progress"]) == 2
    assert "--gen-users" in capsys.readouterr().err
    assert not out.exists()  # refused before any training or writing


@pytest.mark.parametrize("flag", ["--ema", "--gen-ema"])
def test_a_moving_average_decay_outside_its_range_is_refused(tmp_path, shared_data, capsys, flag):
    from paramcast.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(out), flag, "1.0", "--no-progress"]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()  # refused before any training or writing


def test_two_learning_rate_schedules_at_once_are_refused(tmp_path, shared_data, capsys):
    from paramcast.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(shared_data / "ml-100k"), "--out", str(out), "--lr-decay", "0.5",
                 "--lr-schedule", "cosine", "--no-progress"]) == 2
    assert "--lr-decay" in capsys.readouterr().err
    assert not out.exists()


def _epoch_batches(ml100k, bucket_batches: int, n: int = 128, bs: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    data = InteractionLog("part", ml100k.sequences[:n], ml100k.n_items, ml100k.user_raw_ids[:n], ml100k.item_raw_ids)
    trainer = Trainer(data, DeviceModelConfig(n_items=data.n_items, **TINY), {},
                      TrainConfig(progress=False, threads=1, cold_fraction=0.0, bucket_batches=bucket_batches), None)
    seqs = list(ml100k.sequences[:n])
    return trainer._batch_order(seqs, bs), np.array([len(s) for s in seqs])


@pytest.mark.parametrize("bucket_batches", [1, 4, 32])
def test_an_epoch_of_batches_covers_every_sequence_once(ml100k, bucket_batches):
    order, lengths = _epoch_batches(ml100k, bucket_batches)
    assert sorted(np.concatenate(order).tolist()) == list(range(len(lengths)))
    if bucket_batches == 32:  # 32 batches of 4 are one chunk: the epoch is sorted, batch ranges end to end
        ranges = sorted((lengths[b].min(), lengths[b].max()) for b in order)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False))


def test_smaller_length_buckets_mix_lengths_within_a_batch(ml100k):
    """`bucket_batches`: lengths are sorted within chunks of that many batches, so 1 leaves every
    batch a random draw (as the public reference draws them) and larger chunks pad less."""
    spread = []
    for k in (1, 4, 32):
        order, lengths = _epoch_batches(ml100k, k)
        spread.append(np.mean([lengths[b].max() - lengths[b].min() for b in order]))
    assert spread[0] > spread[1] > spread[2]
    with pytest.raises(ValueError, match="bucket_batches"):
        _epoch_batches(ml100k, 0)


def test_position_weighting_makes_an_epoch_of_bucketed_batches_the_mean_over_every_target(ml100k):
    """Length-bucketed batches averaged one by one tilt an epoch towards short histories; with
    `loss_weighting="position"` the batch losses of an epoch average to the per-position mean over
    every training target, as batches drawn without regard to length would."""
    from paramcast.cloud.losses import full_softmax_loss
    from paramcast.cloud.model import DeviceModel, left_pad

    lengths = [3, 4, 5, 6, 30, 40, 60, 80] * 6  # short and long histories: bucketing separates them
    seqs = [np.asarray(s[:n]) for s, n in zip(ml100k.sequences, lengths, strict=False)]
    data = InteractionLog("part", seqs, ml100k.n_items, ml100k.user_raw_ids[:len(seqs)], ml100k.item_raw_ids)
    model_cfg = DeviceModelConfig(n_items=data.n_items, **TINY)
    torch.manual_seed(0)
    model = DeviceModel(model_cfg).eval()  # no dropout: a batch's loss is a function of its sequences

    def epoch_mean(weighting: str) -> tuple[float, float]:
        cfg = TrainConfig(progress=False, threads=1, cold_fraction=0.0, loss="ce", batch_size=4,
                          slim_train_prob=0.0, loss_weighting=weighting)
        trainer = Trainer(data, model_cfg, {}, cfg, None)
        seen: dict = {}

        def capture(stage, selected, params, lr, batches, n_batches, step, *args, **kwargs):
            with torch.no_grad():
                losses = [float(step(b)) for b in batches()]
            seen.update(mean=sum(losses) / n_batches, n=len(losses), n_batches=n_batches)

        trainer._fit = capture
        trainer._train_next_item("static", model, trainer.fit_seqs, model_cfg.max_len, False, None, "static",
                                 cfg.batch_size, cfg.lr, cfg.patience)
        assert seen["n"] == seen["n_batches"]
        x = left_pad(trainer.fit_seqs, model_cfg.max_len + 1)
        targets = x[:, 1:] * (x[:, :-1] > 0)  # every item that follows one the model has read
        with torch.no_grad():
            everything = full_softmax_loss(model.user_states(x[:, :-1]), model.output_table(), targets)
        return seen["mean"], float(everything)

    by_position, everything = epoch_mean("position")
    assert by_position == pytest.approx(everything, rel=1e-4)
    by_batch, _ = epoch_mean("batch")
    assert abs(by_batch - everything) > 1e-2  # the tilt the weighting removes is there to remove
    with pytest.raises(ValueError, match="loss weighting 'tokens'"):
        Trainer(data, model_cfg, {}, TrainConfig(progress=False, threads=1, loss_weighting="tokens"), None)

"""Training: the static device model, the cloud model, then the generator that distils the cloud
model into per-device deltas, with both models frozen.

The static stage trains the device model (SASRec sized for a device) with one of the losses in
cloud/losses.py (`TrainConfig.loss`; the default, cloud/presets.py DEFAULT_LOSS, is the one
validation chose on both evaluation protocols). The cloud stage trains the cloud model
(cloud/cloud_model.py: whole history, wider, deeper, side features) the same way on the same users.
The generator stage is DUET's setting with a teacher: the device model is frozen and the generator,
reading the cloud model's view of the history up to a random cut plus the device's own state
there, emits a delta (and masks); the loss is cross-entropy on the next items after the cut plus
the KL divergence from the cloud model's next-item distribution at those positions, so the device
with its delta ranks as the cloud does, and keeps doing so for a while as its window moves on.
Every stage validates on a fixed validation sample (every `eval_every` epochs for the sequence
models), stops after `patience` epochs without a better validation NDCG@10 (for the sequence
models counted from `warmup_epochs` at the earliest) and keeps the best weights; runs are
reproducible for a seed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim import swa_utils
from tqdm import tqdm

from paramcast.cloud import distributed
from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.generator import KEEP_RATIOS, Generator, build_generator, window_batch
from paramcast.cloud.losses import LossConfig, sequence_loss
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad
from paramcast.cloud.presets import DEFAULT_LOSS, sequence_regime
from paramcast.common.evaluation import FULL_PREFIX, LeaveOneOut
from paramcast.common.interactions import InteractionLog

log = logging.getLogger(__name__)


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without validation improvement before stopping
    # The next-item stages count patience from this epoch at the earliest. A sequence model first
    # sits on the popularity plateau, and its early epochs' validation scores are noise around it:
    # measured on ml-100k, a cloud model reading user features (seed 42) stayed at validation
    # NDCG@10 0.22-0.24 for 8 epochs and was stopped there at patience 5 (0.2391), where its twin
    # without them left the plateau at epoch 7 and reached 0.4572. Every committed run had its best
    # epoch at 10 or later, so none stops differently.
    warmup_epochs: int = 10
    # > 0: the sequence models' learning rate is multiplied by lr_decay after lr_decay_after epochs
    # without a better validation score (counted again from each decay); early stopping still
    # waits `patience` epochs from the best one
    lr_decay: float = 0.0
    lr_decay_after: int = 10
    # "cosine": the sequence models' learning rate follows half a cosine from lr at the first step to
    # zero at the last step of the `epochs` budget (a function of the step, so a resumed stage
    # continues on the same curve); "constant" keeps lr throughout
    lr_schedule: str = "constant"
    eval_every: int = 1  # stage-1 epochs between validations (the last epoch is always validated)
    # How the next-item stages weigh target positions. "position": every target position of an epoch
    # weighs the same, the objective of batches drawn without regard to length. "batch": each
    # length-bucketed batch's loss is its own mean, so a batch of short histories moves the weights as
    # far as one of long histories. Measured (benchmarks/notes/reference.md, quality-ml-100k.md),
    # "position" learned faster and ended higher: amazon-beauty reference-preset validation NDCG@10
    # 0.3452 -> 0.3778 (sampled loss), ml-100k cloud model 0.4571 -> 0.4712.
    loss_weighting: str = "position"
    # Batches per length-sorted chunk of the shuffled sequences (_batch_order): 32 lets a sparse
    # log's batches pad to their own short lengths; 1 draws every batch at random, as the public
    # SASRec reference does, whatever the padding costs.
    bucket_batches: int = 32
    select: str = "sampled"  # protocol whose validation NDCG@10 early stopping maximises: sampled | full
    valid_full: bool = True  # the static stage also records full-ranking validation NDCG@10
    loss: str = "auto"  # cloud/losses.py: bce | gbce | sampled | ce | a mixture x+y; auto = DEFAULT_LOSS
    n_negatives: int = 0  # 0 = the loss's default (cloud/losses.py DEFAULT_NEGATIVES)
    gbce_t: float = 0.75
    logq: bool = False
    mix_weight: float = 1.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = every core this process may run on
    cold_fraction: float = 0.1  # users held out of training entirely, for cold-start evaluation
    valid_users: int = 0  # 0 = all; otherwise a fixed sample of validation users for early stopping
    ema: float = 0.0  # > 0: the static and cloud stages validate and keep a moving average of the weights
    # generator stage
    gen_epochs: int = 30
    # The MLP generator. 1e-3 leads in the first epochs, but its validation NDCG@10 swings enough
    # that early stopping kept epoch 2 on one seed; run to convergence on ml-100k validation (seeds
    # 42, 43) 3e-4 reached generated NDCG@10 0.4326 / 0.4474 against 0.4344 / 0.4404.
    gen_lr: float = 3e-4
    gen_batch_size: int = 32
    gen_patience: int = 5
    gen_ema: float = 0.0  # > 0: validate and keep an exponential moving average of the generator's weights
    horizon: int = 4  # next items after the cut that a generated delta is trained on
    gen_cuts: int = 4  # cut points drawn per training sequence and epoch (each a generator sample)
    # Up to this many interactions between a delta's window and its use. With the cloud slot, on
    # ml-100k validation (seed 42, the same frozen models): 20 against 0 kept stale@20 - static at
    # +0.0208 [0.0090, 0.0328] against +0.0041 [-0.0085, 0.0175], for a fresh gain of +0.0422
    # against +0.0504 (gap closed 0.71 against 0.84): a delta is held for many interactions between
    # requests, so it is trained to last.
    gen_staleness: int = 20
    cloud_batch_size: int = 32  # 0 = batch_size. Long sequences make a batch costly; measured on ml-100k, 32 left
    # the popularity plateau within 6 epochs where 128 was still on it after 9, at the same cost per epoch
    cloud_lr: float = 0.0  # 0 = lr
    # 0 = patience. Measured on ml-100k (benchmarks/notes/quality-ml-100k.md), 20 let the cloud model
    # train to validation NDCG@10 0.4734 / 0.4952 (seeds 42 / 43) where 5 stopped it at 0.4572 / 0.4745,
    # though in the default seed-42 pipeline it found nothing better than 5's epoch 33.
    cloud_patience: int = 0
    side_features: bool = True  # the cloud model reads the items' side features where the data has them
    # The cloud model also reads the users' side features (a profile per user). Off: on ml-100k
    # validation it was level with the model without them, and requests carry no profile, so a
    # cloud model that reads them is an upper bound only (no generator stage on it).
    user_features: bool = False
    distill_weight: float = 1.0  # weight of KL(cloud || device + delta) beside the true next items
    distill_temperature: float = 1.0
    # Last training items per user kept from stage 1 and used only as stage-2 targets: the generator
    # then learns on transitions the frozen device model never fitted, as it will be used online.
    gen_holdout: int = 0
    # Cuts are drawn from this share of each sequence on: a request carries a device's history so
    # far, which at serving time is mostly longer than the device's window.
    gen_cut_from: float = 0.0
    # Share of the warm users kept out of the cloud stage and used by the generator stage alone.
    gen_users: float = 0.0
    slim_prob: float = 0.5  # share of generator batches trained under a random keep-ratio mask
    # Share of stage-1 batches run under random unit masks (structured dropout), so the frozen device
    # model already tolerates the subnets the generator will pick (DIET trains its subnets jointly).
    slim_train_prob: float = 0.25
    joint: bool = False  # also fine-tune the device model in stage 2 (not DUET's default)
    # The device model carries the cloud model's item table and the generator emits the `head.cloud`
    # slot too (cloud/model.py): a delta can then move scores in the cloud's item space. Measured on
    # ml-100k validation (seed 42, the same frozen models, benchmarks/notes/quality-ml-100k.md):
    # generated - static +0.0504 against +0.0298 with the head slots alone, gap closed 0.84 / 0.50.
    cloud_slot: bool = True
    progress: bool = True
    resume: bool = False  # the static and cloud stages save progress in the output folder and continue from it

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_config(self, n_items: int) -> LossConfig:
        """The loss to train with; `auto` is DEFAULT_LOSS, except that a full softmax over more than
        CE_MAX_ITEMS items falls back to sampled softmax with logQ correction."""
        name = DEFAULT_LOSS if self.loss == "auto" else self.loss
        logq = self.logq
        if self.loss == "auto" and "ce" in name.split("+") and n_items > CE_MAX_ITEMS:
            name, logq = name.replace("ce", "sampled"), True
        cfg = LossConfig(name=name, n_negatives=self.n_negatives, gbce_t=self.gbce_t, logq=logq,
                         mix_weight=self.mix_weight)
        cfg.components()  # fails early, naming the loss, if it is unknown
        return cfg


CE_MAX_ITEMS = 50_000
LOSS_WEIGHTINGS = ("position", "batch")


def resolve_threads(threads: int) -> int:
    """Torch CPU threads, set explicitly: `threads`, or every core this process may run on."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def early_stopping_users(eval_users: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The validation users every stage's early stopping scores: all of them, or a fixed sample of
    `n` (TrainConfig.valid_users). `paramcast evaluate --stage held-out` scores the others: choices
    made after training are then not judged on the users that chose the training's epochs."""
    if n and len(eval_users) > n:
        return np.sort(np.random.default_rng(seed).choice(eval_users, n, replace=False))
    return eval_users


def split_users(log_: InteractionLog, cold_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(warm, cold) user indices; cold users are held out of both training stages."""
    users = np.arange(log_.n_users)
    rng = np.random.default_rng(seed + 7919)
    n_cold = int(round(cold_fraction * log_.n_users))
    cold = np.sort(rng.choice(users, size=n_cold, replace=False)) if n_cold else np.empty(0, np.int64)
    warm = np.setdiff1d(users, cold)
    return warm, cold


class Trainer:
    """Holds the data views both stages use; `fit()` runs stage 1 then stage 2."""

    def __init__(self, data: InteractionLog, model_cfg: DeviceModelConfig, gen_cfg: dict, cfg: TrainConfig,
                 evaluator, progress_dir: Path | None = None):
        self.data, self.cfg, self.model_cfg, self.gen_overrides = data, cfg, model_cfg, gen_cfg
        self.dist = distributed.context(cfg.device)  # distributed: a world of one outside torchrun
        self.torch_device = self.dist.torch_device(resolve_device(cfg.device))
        self.threads = resolve_threads(self.dist.threads(cfg.threads))  # distributed: a share of the cores
        self.progress_dir = progress_dir  # where the next-item stages save progress, to resume after an interruption
        self.loss_cfg = cfg.loss_config(data.n_items)
        if cfg.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {cfg.loss_weighting!r}; known: {', '.join(LOSS_WEIGHTINGS)}")
        seed_everything(cfg.seed)
        self.warm, self.cold = split_users(data, cfg.cold_fraction, cfg.seed)
        self.split = LeaveOneOut.of(data, self.warm)
        warm_train = [(int(u), s) for u, s in zip(self.split.users, self.split.train_sequences(), strict=True)
                      if len(s) >= 2]
        self.train_seqs = [s for _, s in warm_train]
        train_users = np.array([u for u, _ in warm_train], dtype=np.int64)  # the log's user of each sequence
        # With a holdout, the device and the cloud model fit each sequence without its last h items,
        # and the generator learns only there: where both make genuine predictions. On the items a
        # model was trained on, the cloud model's distribution is memorised (measured on ml-100k:
        # NDCG@10 0.56 on the last training item against 0.46 on validation, the device model's 0.46
        # and 0.42), so distilling it there teaches deltas larger than held-out data supports.
        h = cfg.gen_holdout

        def fitted(seqs: list[np.ndarray], users: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
            """What a next-item stage fits: each sequence less the holdout, and whose it is."""
            if not h:
                return seqs, users
            kept = np.array([len(s) - h >= 2 for s in seqs], dtype=bool)
            return [s[: len(s) - h] for s, k in zip(seqs, kept, strict=True) if k], users[kept]

        self.fit_seqs, fit_users = fitted(self.train_seqs, train_users)
        # With a share of generator users, the cloud model never fits those users' sequences and the
        # generator learns on them alone, so its encoder and teacher see every training sequence as
        # they see a device's at serving time. Measured on ml-100k it lost more (a weaker cloud
        # model) than it gained (benchmarks/notes/quality-ml-100k.md), so it is off by default.
        self.gen_seqs, self.cloud_seqs, self.cloud_users = self.train_seqs, self.fit_seqs, fit_users
        if cfg.gen_users > 0:
            held = np.zeros(len(self.train_seqs), bool)
            held[np.random.default_rng(cfg.seed + 2).choice(len(held), int(round(cfg.gen_users * len(held))),
                                                            replace=False)] = True
            self.gen_seqs = [s for s, g in zip(self.train_seqs, held, strict=True) if g]
            self.cloud_seqs, self.cloud_users = fitted(
                [s for s, g in zip(self.train_seqs, held, strict=True) if not g], train_users[~held])
        self.valid_users = early_stopping_users(self.split.eval_users(), cfg.valid_users, cfg.seed)
        # (checkpoint, data, users, stage, variants, protocol=) -> {variant: per-user metrics}
        self.evaluator = evaluator
        seed = self.dist.rank_seed(cfg.seed)  # distributed: per-rank step randomness (rank 0: cfg.seed)
        self.rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)
        # Negatives are drawn on the device that uses them.
        self.negatives_gen = torch.Generator(device=self.torch_device).manual_seed(seed + 1)
        self.history: dict[str, list] = {"static": [], "cloud": [], "generator": []}
        self.best_epoch: dict[str, int] = {}

    # -- stage 1 ----------------------------------------------------------------------------------
    def _batch_order(self, seqs: list[np.ndarray], bs: int) -> list[np.ndarray]:
        """Shuffled batches of similar-length sequences: a random permutation is cut into chunks of
        `bucket_batches` batches (32 by default), each chunk is sorted by length, and batch order is
        shuffled again. Short sequences then pad to their own length instead of max_len (most of a
        sparse log's batch would otherwise be padding)."""
        lengths = np.array([len(s) for s in seqs])
        rng = self.dist.shared_rng(self.rng)  # distributed: every rank shuffles alike, then takes its share
        bs = self.dist.local_batch_size(bs)
        order = rng.permutation(len(seqs))
        if self.cfg.bucket_batches < 1:
            raise ValueError(f"bucket_batches must be at least one batch; got {self.cfg.bucket_batches}")
        chunk = self.cfg.bucket_batches * bs
        batches: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i:i + bs] for i in range(0, len(part), bs))
        return self.dist.shard([batches[i] for i in rng.permutation(len(batches))])

    def _sequence_batches(self, seqs: list[np.ndarray], max_len: int, batch_size: int,
                          profiles: torch.Tensor | None = None):
        """(inputs, next items, the rows' own items, their (B, F) profiles: F = 0 without)."""
        for idx in self._batch_order(seqs, batch_size):
            x = left_pad([seqs[i] for i in idx], max_len + 1, trim=True)  # (B, T+1)
            inputs = x[:, :-1]
            profile = (profiles[torch.as_tensor(idx)] if profiles is not None
                       else torch.zeros(len(idx), 0, dtype=torch.long))
            # A sequence's first item is a target of nothing: where the input is padding the state
            # is the same constant for every row, and whether a row's first item sits behind padding
            # or is cut off depends on the longest row it was batched with. Own items are never negatives.
            yield inputs, x[:, 1:] * (inputs > 0), x, profile

    def _fit(self, stage: str, selected: torch.nn.Module, params: list, lr: float, batches, n_batches: int,
             step, epochs: int, patience: int, validate, train_modes, every: int = 1, warmup: int = 0,
             resume_key: dict | None = None, ema: float = 0.0, lr_decay: float = 0.0,
             lr_decay_after: int = 10, lr_schedule: str = "constant") -> float:
        """The loop both stages share: Adam over `params`, validation every `every` epochs (and after
        the last), early stopping after `patience` epochs without improvement, counted from the best
        epoch or from epoch `warmup`, whichever is later. With `resume_key` (the
        model's configuration) and a progress folder, progress is saved after each validation and a
        run interrupted with the same key continues from it.

        `step(batch)` returns the loss; `validate()` a dict of validation scores whose "select" entry
        is maximised; `train_modes(on)` switches the modules being trained. The best state of
        `selected` is restored at the end, and an untrained start (epoch 0) competes too when
        `stage` is the generator's. With `ema` > 0, validation (and the state kept) uses an
        exponential moving average of `selected`'s weights with that decay per step instead of the
        last step's weights. With `lr_decay` > 0 the learning rate is multiplied by it after
        `lr_decay_after` epochs without a better validation score (a plateau schedule). With
        `lr_schedule` "cosine" it follows half a cosine from `lr` to zero over `epochs` epochs."""
        cfg = self.cfg
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        averaged = swa_utils.AveragedModel(selected, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(ema),
                                           use_buffers=True) if ema > 0 else None
        best = validate()["select"] if stage == "generator" else float("-inf")
        untrained, best_state, best_epoch = best, copy.deepcopy(selected.state_dict()), 0
        every = max(1, every)
        start, progress, key = 1, None, {}
        decayed = 0  # the epoch the plateau count starts from: the best, or the last decay if later
        if self.progress_dir is not None and resume_key is not None:
            rank = f"-rank{self.dist.rank}" if self.dist.enabled else ""  # each rank resumes its own streams
            progress = self.progress_dir / f"{stage}-progress{rank}.pt"
            key = self._progress_key(stage, resume_key)
        if progress is not None and (saved := self._load_progress(progress, key)) is not None:
            selected.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            best, best_state, best_epoch = saved["best"], saved["best_state"], saved["best_epoch"]
            start, decayed = saved["epoch"] + 1, saved.get("decayed", best_epoch)
            if averaged is not None:  # the key holds the decay, so a saved average is there whenever one runs
                averaged.load_state_dict(saved["averaged"])
            log.info("%s: resumed after epoch %d from %s", stage, saved["epoch"], progress)
        for epoch in range(start, epochs + 1):
            train_modes(True)
            t0, total = time.perf_counter(), 0.0
            bar = tqdm(batches(), total=n_batches, desc=f"{stage} epoch {epoch}",
                       disable=not (cfg.progress and self.dist.is_writer), leave=False)
            steps = 0
            for batch in bar:
                if lr_schedule == "cosine":
                    done = ((epoch - 1) * n_batches + steps) / max(1, epochs * n_batches)
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
                steps += 1
                loss = step(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if averaged is not None:
                    averaged.update_parameters(selected)
                total += loss.item()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            train_modes(False)
            loss_mean = self.dist.mean(total / max(steps, 1))  # distributed: averaged over ranks
            record: dict = {"epoch": epoch, "loss": loss_mean, "train_seconds": time.perf_counter() - t0}
            validated = epoch % every == 0 or epoch == epochs
            if validated:
                if averaged is not None:  # validate the average; the optimiser goes on from the last weights
                    last = copy.deepcopy(selected.state_dict())
                    selected.load_state_dict(averaged.module.state_dict())
                scores = validate()
                record.update({f"valid_{k}": v for k, v in scores.items() if k != "select"})
                score = scores["select"]
                log.info("%s epoch %d loss %.4f valid %s (best %.4f at epoch %d, at start %.4f, %.1fs)", stage,
                         epoch, record["loss"], {k: round(v, 4) for k, v in scores.items()}, max(best, score),
                         epoch if score > best else best_epoch, untrained, time.perf_counter() - t0)
                if score > best:
                    best, best_state, best_epoch = score, copy.deepcopy(selected.state_dict()), epoch
                if averaged is not None:
                    selected.load_state_dict(last)
            record["seconds"] = time.perf_counter() - t0
            self.history[stage].append(record)
            if epoch - max(best_epoch, warmup) >= patience:
                break
            decayed = max(decayed, best_epoch)
            if validated and lr_decay > 0 and epoch - decayed >= lr_decay_after:
                for group in opt.param_groups:
                    group["lr"] *= lr_decay
                decayed = epoch
                log.info("%s epoch %d: learning rate %.2e (no better validation for %d epochs)", stage, epoch,
                         opt.param_groups[0]["lr"], lr_decay_after)
                record["lr"] = opt.param_groups[0]["lr"]
            if validated and progress is not None:
                self._save_progress(progress, stage, key, epoch, selected, opt, best, best_state, best_epoch,
                                    decayed, averaged)
        selected.load_state_dict(best_state)
        self.best_epoch[stage] = best_epoch
        if progress is not None:
            progress.unlink(missing_ok=True)
        return best

    # -- resuming an interrupted stage --------------------------------------------------------------
    def _progress_key(self, stage: str, model_key: dict) -> dict:
        """What a saved stage must match to be resumed: the data, the model and the training settings."""
        train_cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "resume", "threads")}
        data = [self.data.name, self.data.n_users, self.data.n_items, self.data.n_interactions]
        return {"stage": stage, "data": data, "model": model_key, "train": train_cfg, "world": self.dist.world}

    def _save_progress(self, path: Path, stage: str, key: dict, epoch: int, selected: torch.nn.Module,
                       opt: torch.optim.Optimizer, best: float, best_state: dict, best_epoch: int,
                       decayed: int = 0, averaged: torch.nn.Module | None = None) -> None:
        """Everything the loop needs to continue exactly as if it had not stopped (CPU random streams
        included), written atomically after each validation."""
        state = {"key": key, "epoch": epoch, "model": selected.state_dict(), "opt": opt.state_dict(),
                 "best": best, "best_state": best_state, "best_epoch": best_epoch, "decayed": decayed,
                 "averaged": None if averaged is None else averaged.state_dict(),
                 "history": self.history[stage],
                 "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
                 "negatives_gen": self.negatives_gen.get_state(), "torch_rng": torch.get_rng_state()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_progress(self, path: Path, key: dict) -> dict | None:
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        if saved["key"] != key:
            log.warning("not resuming from %s: it was saved for other data or settings", path)
            return None
        self.history[key["stage"]] = saved["history"]
        self.rng.bit_generator.state = saved["rng"]
        self.torch_gen.set_state(saved["torch_gen"])
        self.negatives_gen.set_state(saved["negatives_gen"])
        torch.set_rng_state(saved["torch_rng"])
        return saved

    def _train_next_item(self, stage: str, model: DeviceModel | CloudModel, seqs: list[np.ndarray], max_len: int,
                         random_masks: bool, ckpt: Checkpoint, variant: str, batch_size: int, lr: float,
                         patience: int, profiles: torch.Tensor | None = None) -> None:
        """Next-item training of one model on `seqs` (the static and the cloud stage; `profiles`, one
        row per sequence, for a cloud model that reads user features), validated as `variant` of `ckpt`."""
        cfg, dev = self.cfg, self.torch_device

        n_batches = -(-len(seqs) // batch_size)
        # "position" weighting: a batch's mean is scaled by its share of the epoch's target positions
        # (times the world, since data-parallel ranks average their gradients).
        positions_per_batch = sum(min(len(s), max_len + 1) - 1 for s in seqs) / max(n_batches, 1)

        def step(batch) -> torch.Tensor:
            inp, tgt, own, profile = (t.to(dev) for t in batch)
            masks = None
            if random_masks and self.rng.random() < cfg.slim_train_prob:
                assert isinstance(model, DeviceModel)
                masks = self._random_masks(model, len(inp))
            if profile.shape[1]:
                assert isinstance(model, CloudModel)
                states = model.user_states(inp, profile=profile)  # (B, L, d)
            else:
                states = model.user_states(inp, None, masks)
            loss = sequence_loss(self.loss_cfg, states, model.output_table(), tgt, own, self.data.n_items,
                                 self.negatives_gen)
            if cfg.loss_weighting == "position":
                # a tensor factor: no host sync per step on an accelerator
                loss = loss * ((tgt > 0).sum() * (self.dist.world / positions_per_batch))
            return loss

        protocol = "both" if cfg.valid_full else cfg.select
        ddp_step = self.dist.data_parallel(step, model)  # distributed: gradients averaged across ranks
        self._fit(stage, model, list(model.parameters()), lr,
                  lambda: self._sequence_batches(seqs, max_len, batch_size, profiles),
                  n_batches, ddp_step, cfg.epochs, patience,
                  lambda: self._validate(ckpt, [variant], protocol), model.train, cfg.eval_every,
                  cfg.warmup_epochs, model.cfg.to_dict(),
                  ema=cfg.ema, lr_decay=cfg.lr_decay, lr_decay_after=cfg.lr_decay_after,
                  lr_schedule=cfg.lr_schedule)

    def train_static(self) -> DeviceModel:
        model = DeviceModel(self.model_cfg).to(self.torch_device)
        self._train_next_item("static", model, self.fit_seqs, self.model_cfg.max_len, True,
                              Checkpoint("train", model), "static", self.cfg.batch_size, self.cfg.lr, self.cfg.patience)
        return model.eval()

    def train_cloud(self, device_model: DeviceModel, cloud_cfg: CloudModelConfig) -> CloudModel:
        """The cloud model, on the device model's sequences less the generator's holdout and users."""
        features = self.data.item_features if self.cfg.side_features else {}
        if self.cfg.user_features and not self.data.user_features:
            raise ValueError(f"user features were asked for, but {self.data.source} has none "
                             "(ml-100k's u.user and ml-1m's users.dat are read)")
        users = self.data.user_features if self.cfg.user_features else None
        cloud = CloudModel.for_data(cloud_cfg, features, users).to(self.torch_device)
        self._train_next_item("cloud", cloud, self.cloud_seqs, cloud_cfg.max_len, False,
                              Checkpoint("train", device_model, cloud_model=cloud), "cloud",
                              self.cfg.cloud_batch_size or self.cfg.batch_size, self.cfg.cloud_lr or self.cfg.lr,
                              self.cfg.cloud_patience or self.cfg.patience,
                              cloud.profiles(self.data.user_features, self.cloud_users))
        return cloud.eval()

    def _random_masks(self, model: DeviceModel, batch: int) -> dict[str, torch.Tensor]:
        """Per-sample random subnets at one keep ratio drawn from KEEP_RATIOS."""
        ratio = float(self.rng.choice(KEEP_RATIOS))
        masks = {}
        for group, n in model.unit_groups().items():
            scores = torch.rand(batch, n, generator=self.torch_gen)
            top = scores.topk(max(1, round(ratio * n)), dim=-1).indices
            masks[group] = torch.zeros(batch, n).scatter_(-1, top, 1.0).to(self.torch_device)
        return masks

    # -- generator stage ----------------------------------------------------------------------
    def _generator_batches(self, window: int, cloud_len: int):
        """(history window, device window, device inputs, cloud inputs, targets) per batch.

        A cut c is drawn per sequence and a staleness o in [0, gen_staleness]; the generator sees
        s[:c - o] (its last `window` items) and the device model's state there, as a device asking
        o interactions ago would have sent; the loss covers the `horizon` positions from the cut,
        where the device runs on its own window with that delta."""
        L, S, stale = self.model_cfg.max_len, self.cfg.horizon, self.cfg.gen_staleness
        h, share = self.cfg.gen_holdout, self.cfg.gen_cut_from
        repeated = [s for s in self.gen_seqs for _ in range(self.cfg.gen_cuts)]
        for idx in self._batch_order(repeated, self.cfg.gen_batch_size):
            windows, inputs, targets = [], [], []
            for i in idx:
                s = repeated[i]
                low = max(1, len(s) - h) if h else 1  # with a holdout, only its items are targets
                low = max(low, min(len(s) - 1, int(share * len(s))))  # --gen-cut-from
                cut = int(self.rng.integers(low, len(s)))  # targets start after s[:cut]
                end = min(len(s), cut + S)
                # An age past the history leaves the first item: drawing ages within the history instead
                # was measured and not adopted (ml-100k validation lost stale@20; BENCHMARKS.md).
                age = int(self.rng.integers(0, stale + 1)) if stale else 0
                windows.append(s[:max(1, cut - age)])
                inputs.append(s[:end - 1])
                t = s[1:end].copy()
                t[: cut - 1] = 0  # targets before the cut would leak into the window
                targets.append(t)
            yield (window_batch(windows, window), left_pad(windows, L, trim=True), left_pad(inputs, L, trim=True),
                   left_pad(inputs, cloud_len, trim=True), left_pad(targets, L, trim=True))

    def train_generator(self, model: DeviceModel, cloud: CloudModel) -> Generator:
        cfg, dev = self.cfg, self.torch_device
        if cfg.cloud_slot:
            model.carry_cloud_items(cloud.output_table())
        gen = build_generator(model, cloud, **self.gen_overrides)
        gcfg = gen.cfg
        params = [p for p in gen.parameters() if p.requires_grad]
        if cfg.joint:
            params += list(model.parameters())
        else:
            model.requires_grad_(False)
        cloud.requires_grad_(False)
        # Selection: the generator makes deltas and subnets, so it is judged on both when it learns both.
        selection = ["generated"] + (["slimmed@0.5"] if cfg.slim_prob > 0 else [])
        T = cfg.distill_temperature

        def step(batch) -> torch.Tensor:
            win, dev_win, inp, cloud_inp, tgt = (t.to(dev) for t in batch)
            with torch.no_grad():
                device_state = model.base_state(dev_win)  # (B, d): the base model at the cut
                teacher = cloud.encode(cloud_inp)[:, -inp.shape[1]:]  # (B, T, D), aligned on the right
            out = gen(win, device_state)
            masks = None
            if self.rng.random() < cfg.slim_prob:
                masks = out.masks(float(self.rng.choice(KEEP_RATIOS)), straight_through=True)
            states = model.user_states(inp, out.adapters, masks)  # (B, T, d)
            keep = tgt > 0
            # Column 0 (padding) is never a target: drop it rather than mask it, so the KL has no -inf.
            student = (states[keep] @ model.output_table().T)[:, 1:]  # (P, n_items)
            loss = F.cross_entropy(student, tgt[keep] - 1)
            if cfg.distill_weight > 0:
                with torch.no_grad():
                    target_logp = F.log_softmax((teacher[keep] @ cloud.output_table().T)[:, 1:] / T, dim=-1)
                kl = F.kl_div(F.log_softmax(student / T, dim=-1), target_logp, log_target=True, reduction="batchmean")
                loss = loss + cfg.distill_weight * T * T * kl
            return loss

        def train_modes(on: bool) -> None:
            gen.train(on)
            model.train(on and cfg.joint)

        train_modes(False)
        ddp_step = self.dist.data_parallel(step, gen, model, sometimes_unused=True)  # distributed: averaged gradients
        self._fit("generator", gen, params, cfg.gen_lr, lambda: self._generator_batches(gcfg.window, cloud.cfg.max_len),
                  -(-len(self.gen_seqs) * cfg.gen_cuts // cfg.gen_batch_size), ddp_step, cfg.gen_epochs,
                  cfg.gen_patience,
                  lambda: self._validate(Checkpoint("train", model, gen, cloud_model=cloud), selection, cfg.select),
                  train_modes, ema=cfg.gen_ema)
        model.requires_grad_(True)
        cloud.requires_grad_(True)
        return gen.eval()

    def _validate(self, ckpt: Checkpoint, variants: list[str], protocol: str) -> dict[str, float]:
        """Validation NDCG@10 per protocol (averaged over `variants`, each over the validation users),
        and under "select" the one early stopping maximises."""
        users = self.valid_users
        if self.dist.enabled and len(users) >= self.dist.world:  # distributed: each rank scores its share
            users = np.asarray(self.dist.shard(users))
        per_variant = self.evaluator(ckpt, self.data, users, "valid", variants, protocol=protocol)
        scores = {}
        for name, metric in (("ndcg@10", "ndcg@10"), ("full:ndcg@10", FULL_PREFIX + "ndcg@10")):
            if metric in per_variant[variants[0]]:
                # distributed: means over every rank's users, so all ranks see the same score
                scores[name] = float(np.mean(self.dist.means([per_variant[v][metric] for v in variants])))
        scores["select"] = scores["full:ndcg@10" if self.cfg.select == "full" else "ndcg@10"]
        return scores


def distils_a_profile_reader(user_features: bool, stages: tuple[str, ...], start: Checkpoint | None) -> bool:
    """Whether the generator stage would distil a cloud model that reads user features: the one the
    cloud stage trains with them, or without a cloud stage the one `start` carries."""
    if "generator" not in stages:
        return False
    if "cloud" in stages:
        return user_features
    return bool(start is not None and start.cloud_model is not None and start.cloud_model.cfg.user_features)


def train(data: InteractionLog, out: str, model_cfg: DeviceModelConfig, cfg: TrainConfig,
          gen_cfg: dict | None = None, stages: tuple[str, ...] = ("static", "cloud", "generator"),
          cloud_cfg: CloudModelConfig | None = None, start: Checkpoint | None = None) -> Checkpoint:
    """Run the stages and return the checkpoint (the caller saves it). The generator stage needs
    a cloud model: the one it reads and distils. `start` supplies already trained models: its device
    model replaces the static stage (so the base version stays, unless the cloud slot gives it the
    cloud item table it did not carry, or a retrained cloud model's), its cloud model the cloud
    stage unless that stage is asked for."""
    from paramcast.cloud.evaluate import per_user_metrics

    has_cloud = "cloud" in stages or (start is not None and start.cloud_model is not None)
    if "generator" in stages and not has_cloud:
        raise ValueError("the generator stage distils the cloud model: add the cloud stage")
    if distils_a_profile_reader(cfg.user_features, stages, start):
        raise ValueError("a cloud model that reads user features cannot be distilled: requests carry a "
                         "device's history, not its owner's profile; drop --user-features or the generator stage")
    t0 = time.perf_counter()
    device_cfg = model_cfg if start is None else start.device_model.cfg
    trainer = Trainer(data, device_cfg, gen_cfg or {}, cfg, per_user_metrics, Path(out) if cfg.resume else None)
    seconds = {}
    if start is None:
        model = trainer.train_static()
        seconds["static"] = time.perf_counter() - t0
    else:
        model = start.device_model.to(trainer.torch_device).eval()
    cloud = start.cloud_model.to(trainer.torch_device).eval() if start is not None and start.cloud_model else None
    if "cloud" in stages:
        t1 = time.perf_counter()
        # by default the cloud model regularises as the log's sequence regime asks (cloud/presets.py)
        cloud = trainer.train_cloud(model, cloud_cfg or CloudModelConfig(
            n_items=data.n_items, dropout=sequence_regime(data)["dropout"]))
        seconds["cloud"] = time.perf_counter() - t1
    gen = None
    if "generator" in stages:
        assert cloud is not None
        t1 = time.perf_counter()
        gen = trainer.train_generator(model, cloud)
        seconds["generator"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    meta = {
        "data": {"name": data.name, "source": data.source, "n_items": data.n_items, "users": data.n_users,
                 "interactions": data.n_interactions},
        "item_raw_ids": data.item_raw_ids,  # the item vocabulary the device package carries
        "split": {"cold_fraction": cfg.cold_fraction, "seed": cfg.seed,
                  "cold_users": [data.user_raw_ids[u] for u in trainer.cold]},
        "train_config": cfg.to_dict(),
        "history": trainer.history if start is None else {**start.meta.get("history", {}), **{
            k: v for k, v in trainer.history.items() if v}},
        "best_epoch": trainer.best_epoch if start is None else {**start.meta.get("best_epoch", {}),
                                                                 **trainer.best_epoch},
        "loss": trainer.loss_cfg.to_dict(),
        "seconds": seconds,
        "torch_threads": trainer.threads,
        "cpu_count": os.cpu_count(),
    }
    if trainer.dist.enabled:  # distributed: the job's shape, and proof that the ranks ended equal
        trainer.dist.check_in_sync(*(m for m in (model, cloud, gen) if m is not None))
        meta["distributed"] = trainer.dist.describe()
    model_id = f"sasrec-{data.name}"
    return Checkpoint(model_id, model.cpu(), gen.cpu() if gen is not None else None, meta,
                       cloud.cpu() if cloud is not None else None)

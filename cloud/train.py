"""Training: the static device model, the cloud model, then the generator that distils the cloud
model into per-device deltas, with both models frozen.

Stage 1 trains the device model (SASRec sized for a device) with softmax cross-entropy over the
catalogue (or over shared sampled negatives for very large catalogues); Klenitskiy & Vasilev
(RecSys 2023) showed this reaches the original binary-loss quality in far fewer epochs. The cloud
stage trains the cloud model (cloud/cloud_model.py: whole history, wider, deeper, side features)
the same way on the same users. The generator stage is DUET's setting with a teacher: the device
model is frozen and the generator, reading the cloud model's view of the history up to a random
cut plus the device's own state there, emits a delta (and masks); the loss is cross-entropy on the
next items after the cut plus the KL divergence from the cloud model's next-item distribution at
those positions, so the device with its delta ranks as the cloud does, and keeps doing so for a
while as its window moves on. Every stage stops early on validation NDCG@10 and keeps the best
weights; runs are reproducible for a seed.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.generator import KEEP_RATIOS, Generator, build_generator, window_batch
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad
from paramcast.common.evaluation import LeaveOneOut
from paramcast.common.interactions import InteractionLog

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # evaluations without validation improvement before stopping
    loss: str = "auto"  # "ce" (full softmax), "sampled" (shared negatives), "auto": ce up to 50k items
    n_negatives: int = 1024
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = all cores
    cold_fraction: float = 0.1  # users held out of training entirely, for cold-start evaluation
    valid_users: int = 0  # 0 = all; otherwise a fixed sample of validation users for early stopping
    # generator stage
    gen_epochs: int = 30
    gen_lr: float = 1e-4  # the factor heads move the whole head at once; larger steps oscillate
    gen_batch_size: int = 32
    gen_patience: int = 5
    horizon: int = 4  # next items after the cut that a generated delta is trained on
    gen_cuts: int = 4  # cut points drawn per training sequence and epoch (each a generator sample)
    gen_staleness: int = 0  # up to this many interactions between a delta's window and its use
    cloud_batch_size: int = 32  # 0 = batch_size. Long sequences make a batch costly; measured on ml-100k, 32 left
    # the popularity plateau within 6 epochs where 128 was still on it after 9, at the same cost per epoch
    cloud_lr: float = 0.0  # 0 = lr
    side_features: bool = True  # the cloud model reads the items' side features where the data has them
    distill_weight: float = 1.0  # weight of KL(cloud || device + delta) beside the true next items
    distill_temperature: float = 1.0
    # Last training items per user kept from stage 1 and used only as stage-2 targets: the generator
    # then learns on transitions the frozen device model never fitted, as it will be used online.
    gen_holdout: int = 0
    slim_prob: float = 0.5  # share of generator batches trained under a random keep-ratio mask
    # Share of stage-1 batches run under random unit masks (structured dropout), so the frozen device
    # model already tolerates the subnets the generator will pick (DIET trains its subnets jointly).
    slim_train_prob: float = 0.25
    joint: bool = False  # also fine-tune the device model in stage 2 (not DUET's default)
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


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


def split_users(log_: InteractionLog, cold_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(warm, cold) user indices; cold users are held out of both training stages."""
    users = np.arange(log_.n_users)
    rng = np.random.default_rng(seed + 7919)
    n_cold = int(round(cold_fraction * log_.n_users))
    cold = np.sort(rng.choice(users, size=n_cold, replace=False)) if n_cold else np.empty(0, np.int64)
    warm = np.setdiff1d(users, cold)
    return warm, cold


def _ce_loss(states: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, cfg: TrainConfig,
             n_items: int, gen: torch.Generator | None) -> torch.Tensor:
    """Cross-entropy of (P, d) user states against (P,) target items."""
    use_full = cfg.loss == "ce" or (cfg.loss == "auto" and n_items <= 50_000)
    if use_full:
        logits = states @ item_emb.T  # (P, n_items + 1)
        logits[:, 0] = float("-inf")  # padding is never a target
        return F.cross_entropy(logits, targets)
    negs = torch.randint(1, n_items + 1, (cfg.n_negatives,), generator=gen).to(states.device)  # (K,)
    pos = (states * item_emb[targets]).sum(-1, keepdim=True)  # (P, 1)
    neg = states @ item_emb[negs].T  # (P, K)
    neg = neg.masked_fill(negs[None, :] == targets[:, None], float("-inf"))  # a sampled positive is no negative
    return F.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros_like(targets))


class Trainer:
    """Holds the data views both stages use; `fit()` runs stage 1 then stage 2."""

    def __init__(self, data: InteractionLog, model_cfg: DeviceModelConfig, gen_cfg: dict, cfg: TrainConfig,
                 evaluator):
        self.data, self.cfg, self.model_cfg, self.gen_overrides = data, cfg, model_cfg, gen_cfg
        self.torch_device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.warm, self.cold = split_users(data, cfg.cold_fraction, cfg.seed)
        self.split = LeaveOneOut.of(data, self.warm)
        self.train_seqs = [s for s in self.split.train_sequences() if len(s) >= 2]
        h = cfg.gen_holdout
        self.static_seqs = [s[: len(s) - h] for s in self.train_seqs if len(s) - h >= 2] if h else self.train_seqs
        self.valid_users = self.split.eval_users()
        if cfg.valid_users and len(self.valid_users) > cfg.valid_users:
            rng = np.random.default_rng(cfg.seed)
            self.valid_users = np.sort(rng.choice(self.valid_users, cfg.valid_users, replace=False))
        self.evaluator = evaluator  # (ckpt, users, stage, variants) -> {variant: per-user metrics}
        self.rng = np.random.default_rng(cfg.seed)
        self.torch_gen = torch.Generator().manual_seed(cfg.seed)
        self.history: dict[str, list] = {"static": [], "cloud": [], "generator": []}

    # -- stage 1 ----------------------------------------------------------------------------------
    def _batch_order(self, seqs: list[np.ndarray], bs: int) -> list[np.ndarray]:
        """Shuffled batches of similar-length sequences: a random permutation is cut into chunks of
        32 batches, each chunk is sorted by length, and batch order is shuffled again. Short
        sequences then pad to their own length instead of max_len (most of a sparse log's batch
        would otherwise be padding)."""
        lengths = np.array([len(s) for s in seqs])
        order = self.rng.permutation(len(seqs))
        chunk = 32 * bs
        batches: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i:i + bs] for i in range(0, len(part), bs))
        return [batches[i] for i in self.rng.permutation(len(batches))]

    def _sequence_batches(self, seqs: list[np.ndarray], max_len: int, batch_size: int):
        for idx in self._batch_order(seqs, batch_size):
            x = left_pad([seqs[i] for i in idx], max_len + 1, trim=True)  # (B, T+1)
            yield x[:, :-1], x[:, 1:]  # inputs, next items

    def _fit(self, stage: str, selected: torch.nn.Module, params: list, lr: float, batches, n_batches: int,
             step, epochs: int, patience: int, validate, train_modes) -> float:
        """The loop both stages share: Adam over `params`, one validation per epoch, early stopping.

        `step(batch)` returns the loss; `validate()` the selection score; `train_modes(on)` switches
        the modules being trained. The best state of `selected` is restored at the end, and an
        untrained start (epoch 0) competes too when `stage` is the generator's."""
        cfg = self.cfg
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        best = validate() if stage == "generator" else float("-inf")
        untrained, best_state, bad = best, copy.deepcopy(selected.state_dict()), 0
        for epoch in range(1, epochs + 1):
            train_modes(True)
            t0, total = time.perf_counter(), 0.0
            bar = tqdm(batches(), total=n_batches, desc=f"{stage} epoch {epoch}", disable=not cfg.progress, leave=False)
            for batch in bar:
                loss = step(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            train_modes(False)
            score = validate()
            seconds = time.perf_counter() - t0
            self.history[stage].append({"epoch": epoch, "loss": total / n_batches, "valid_ndcg@10": score,
                                        "seconds": seconds})
            log.info("%s epoch %d loss %.4f valid ndcg@10 %.4f (best %.4f, at start %.4f, %.1fs)", stage, epoch,
                     total / n_batches, score, max(best, score), untrained, seconds)
            if score > best:
                best, best_state, bad = score, copy.deepcopy(selected.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
        selected.load_state_dict(best_state)
        return best

    def _train_next_item(self, stage: str, model: DeviceModel | CloudModel, seqs: list[np.ndarray], max_len: int,
                         random_masks: bool, validate, batch_size: int, lr: float) -> None:
        """Next-item training of one model on `seqs` (stage 1 and the cloud stage)."""
        cfg, dev = self.cfg, self.torch_device

        def step(batch) -> torch.Tensor:
            inp, tgt = (t.to(dev) for t in batch)
            masks = None
            if random_masks and self.rng.random() < cfg.slim_train_prob:
                assert isinstance(model, DeviceModel)
                masks = self._random_masks(model, len(inp))
            states = model.user_states(inp, None, masks)  # (B, L, d)
            keep = tgt > 0
            return _ce_loss(states[keep], tgt[keep], model.output_table(), cfg, self.data.n_items, self.torch_gen)

        self._fit(stage, model, list(model.parameters()), lr, lambda: self._sequence_batches(seqs, max_len, batch_size),
                  -(-len(seqs) // batch_size), step, cfg.epochs, cfg.patience, validate, model.train)

    def train_static(self) -> DeviceModel:
        model = DeviceModel(self.model_cfg).to(self.torch_device)
        self._train_next_item("static", model, self.static_seqs, self.model_cfg.max_len, True,
                              lambda: self._valid_ndcg(Checkpoint("train", model), ["static"]),
                              self.cfg.batch_size, self.cfg.lr)
        return model.eval()

    def train_cloud(self, device_model: DeviceModel, cloud_cfg: CloudModelConfig) -> CloudModel:
        """The cloud model, on every training item (the generator's holdout is a device-side matter)."""
        features = self.data.item_features if self.cfg.side_features else {}
        cloud = CloudModel.for_data(cloud_cfg, features).to(self.torch_device)
        self._train_next_item("cloud", cloud, self.train_seqs, cloud_cfg.max_len, False,
                              lambda: self._valid_ndcg(Checkpoint("train", device_model, cloud_model=cloud),
                                                       ["cloud"]),
                              self.cfg.cloud_batch_size or self.cfg.batch_size, self.cfg.cloud_lr or self.cfg.lr)
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
        h = self.cfg.gen_holdout
        repeated = [s for s in self.train_seqs for _ in range(self.cfg.gen_cuts)]
        for idx in self._batch_order(repeated, self.cfg.gen_batch_size):
            windows, inputs, targets = [], [], []
            for i in idx:
                s = repeated[i]
                low = max(1, len(s) - h) if h else 1  # with a holdout, only its items are targets
                cut = int(self.rng.integers(low, len(s)))  # targets start after s[:cut]
                end = min(len(s), cut + S)
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
                device_state = model.user_states(dev_win)[:, -1]  # (B, d): the base model at the cut
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
        self._fit("generator", gen, params, cfg.gen_lr, lambda: self._generator_batches(gcfg.window, cloud.cfg.max_len),
                  -(-len(self.train_seqs) * cfg.gen_cuts // cfg.gen_batch_size), step, cfg.gen_epochs, cfg.gen_patience,
                  lambda: self._valid_ndcg(Checkpoint("train", model, gen, cloud_model=cloud), selection),
                  train_modes)
        model.requires_grad_(True)
        cloud.requires_grad_(True)
        return gen.eval()

    def _valid_ndcg(self, ckpt: Checkpoint, variants: list[str]) -> float:
        """Mean validation NDCG@10 over `variants` (each averaged over the validation users)."""
        per_variant = self.evaluator(ckpt, self.data, self.valid_users, "valid", variants)
        return float(np.mean([np.mean(per_variant[v]["ndcg@10"]) for v in variants]))


def train(data: InteractionLog, out: str, model_cfg: DeviceModelConfig, cfg: TrainConfig,
          gen_cfg: dict | None = None, stages: tuple[str, ...] = ("static", "cloud", "generator"),
          cloud_cfg: CloudModelConfig | None = None, start: Checkpoint | None = None) -> Checkpoint:
    """Run the stages and return the checkpoint (the caller saves it). The generator stage needs
    a cloud model: the one it reads and distils. `start` supplies already trained models: its device
    model replaces the static stage (so the base version stays), its cloud model the cloud stage
    unless that stage is asked for."""
    from paramcast.cloud.evaluate import per_user_metrics

    has_cloud = "cloud" in stages or (start is not None and start.cloud_model is not None)
    if "generator" in stages and not has_cloud:
        raise ValueError("the generator stage distils the cloud model: add the cloud stage")
    t0 = time.perf_counter()
    device_cfg = model_cfg if start is None else start.device_model.cfg
    trainer = Trainer(data, device_cfg, gen_cfg or {}, cfg, per_user_metrics)
    seconds = {}
    if start is None:
        model = trainer.train_static()
        seconds["static"] = time.perf_counter() - t0
    else:
        model = start.device_model.to(trainer.torch_device).eval()
    cloud = start.cloud_model.to(trainer.torch_device).eval() if start is not None and start.cloud_model else None
    if "cloud" in stages:
        t1 = time.perf_counter()
        cloud = trainer.train_cloud(model, cloud_cfg or CloudModelConfig(n_items=data.n_items))
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
        "split": {"cold_fraction": cfg.cold_fraction, "seed": cfg.seed,
                  "cold_users": [data.user_raw_ids[u] for u in trainer.cold]},
        "train_config": cfg.to_dict(),
        "history": trainer.history if start is None else {**start.meta.get("history", {}), **{
            k: v for k, v in trainer.history.items() if v}},
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    model_id = f"sasrec-{data.name}"
    return Checkpoint(model_id, model.cpu(), gen.cpu() if gen is not None else None, meta,
                       cloud.cpu() if cloud is not None else None)

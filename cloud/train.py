"""Training: the static device model first, then the generator with the static weights frozen.

Stage 1 trains SASRec with one of the losses in cloud/losses.py (`TrainConfig.loss`; the default,
cloud/presets.py DEFAULT_LOSS, is the one validation chose on both evaluation protocols). Stage 2
is DUET's setting: the device model is frozen and the generator learns to emit deltas (and masks)
from a window of the user's past that ends at a random cut; the loss is the next items after the
cut, so the generator learns what a fresh or slightly stale delta should do. Both stages validate
on a fixed validation sample (stage 1 every `eval_every` epochs), stop after `patience` epochs
without a better validation NDCG@10 and keep the best weights; runs are reproducible for a seed.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.generator import KEEP_RATIOS, Generator, GeneratorConfig, window_batch
from paramcast.cloud.losses import LossConfig, sequence_loss
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad
from paramcast.cloud.presets import DEFAULT_LOSS
from paramcast.common.evaluation import FULL_PREFIX, LeaveOneOut
from paramcast.common.interactions import InteractionLog

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5  # epochs without validation improvement before stopping
    eval_every: int = 1  # stage-1 epochs between validations (the last epoch is always validated)
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
    # generator stage
    gen_epochs: int = 30
    gen_lr: float = 1e-4  # the factor heads move the whole head at once; larger steps oscillate
    gen_batch_size: int = 32
    gen_patience: int = 5
    horizon: int = 4  # next items after the cut that a generated delta is trained on
    # Last training items per user kept from stage 1 and used only as stage-2 targets: the generator
    # then learns on transitions the frozen device model never fitted, as it will be used online.
    gen_holdout: int = 0
    slim_prob: float = 0.5  # share of generator batches trained under a random keep-ratio mask
    # Share of stage-1 batches run under random unit masks (structured dropout), so the frozen device
    # model already tolerates the subnets the generator will pick (DIET trains its subnets jointly).
    slim_train_prob: float = 0.25
    joint: bool = False  # also fine-tune the device model in stage 2 (not DUET's default)
    progress: bool = True
    resume: bool = False  # stage 1 saves its progress in the output folder and continues from it if found

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
                 evaluator, progress_path: Path | None = None):
        self.data, self.cfg, self.model_cfg, self.gen_overrides = data, cfg, model_cfg, gen_cfg
        self.progress_path = progress_path  # where stage 1 saves its progress, to resume after an interruption
        self.torch_device = resolve_device(cfg.device)
        self.threads = resolve_threads(cfg.threads)
        self.loss_cfg = cfg.loss_config(data.n_items)
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
        # (checkpoint, data, users, stage, variants, protocol=) -> {variant: per-user metrics}
        self.evaluator = evaluator
        self.rng = np.random.default_rng(cfg.seed)
        self.torch_gen = torch.Generator().manual_seed(cfg.seed)
        # Negatives are drawn on the device that uses them.
        self.negatives_gen = torch.Generator(device=self.torch_device).manual_seed(cfg.seed + 1)
        self.history: dict[str, list] = {"static": [], "generator": []}
        self.best_epoch: dict[str, int] = {}

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

    def _static_batches(self):
        L = self.model_cfg.max_len
        for idx in self._batch_order(self.static_seqs, self.cfg.batch_size):
            x = left_pad([self.static_seqs[i] for i in idx], L + 1, trim=True)  # (B, T+1)
            yield x[:, :-1], x[:, 1:], x  # inputs, next items, the row's own items (never its negatives)

    def _fit(self, stage: str, selected: torch.nn.Module, params: list, lr: float, batches, n_batches: int,
             step, epochs: int, patience: int, validate, train_modes, every: int = 1) -> float:
        """The loop both stages share: Adam over `params`, validation every `every` epochs (and after
        the last), early stopping after `patience` epochs without improvement.

        `step(batch)` returns the loss; `validate()` a dict of validation scores whose "select" entry
        is maximised; `train_modes(on)` switches the modules being trained. The best state of
        `selected` is restored at the end, and an untrained start (epoch 0) competes too when
        `stage` is the generator's."""
        cfg = self.cfg
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        best = validate()["select"] if stage == "generator" else float("-inf")
        untrained, best_state, best_epoch = best, copy.deepcopy(selected.state_dict()), 0
        every = max(1, every)
        start = 1
        progress = self.progress_path if stage == "static" else None
        if progress is not None and (saved := self._load_progress(progress)) is not None:
            selected.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            best, best_state, best_epoch = saved["best"], saved["best_state"], saved["best_epoch"]
            start = saved["epoch"] + 1
            log.info("%s: resumed after epoch %d from %s", stage, saved["epoch"], progress)
        for epoch in range(start, epochs + 1):
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
            record: dict = {"epoch": epoch, "loss": total / n_batches, "train_seconds": time.perf_counter() - t0}
            validated = epoch % every == 0 or epoch == epochs
            if validated:
                scores = validate()
                record.update({f"valid_{k}": v for k, v in scores.items() if k != "select"})
                score = scores["select"]
                log.info("%s epoch %d loss %.4f valid %s (best %.4f at epoch %d, at start %.4f, %.1fs)", stage,
                         epoch, record["loss"], {k: round(v, 4) for k, v in scores.items()}, max(best, score),
                         epoch if score > best else best_epoch, untrained, time.perf_counter() - t0)
                if score > best:
                    best, best_state, best_epoch = score, copy.deepcopy(selected.state_dict()), epoch
            record["seconds"] = time.perf_counter() - t0
            self.history[stage].append(record)
            if epoch - best_epoch >= patience:
                break
            if validated and progress is not None:
                self._save_progress(progress, epoch, selected, opt, best, best_state, best_epoch)
        selected.load_state_dict(best_state)
        self.best_epoch[stage] = best_epoch
        if progress is not None:
            progress.unlink(missing_ok=True)
        return best

    # -- resuming an interrupted stage 1 ----------------------------------------------------------
    def _progress_key(self) -> dict:
        """What a saved run must match to be resumed: the data, the model and the training settings."""
        train_cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("progress", "resume", "threads")}
        return {"data": [self.data.name, self.data.n_users, self.data.n_items, self.data.n_interactions],
                "model": self.model_cfg.to_dict(), "train": train_cfg}

    def _save_progress(self, path: Path, epoch: int, selected: torch.nn.Module, opt: torch.optim.Optimizer,
                       best: float, best_state: dict, best_epoch: int) -> None:
        """Everything the loop needs to continue exactly as if it had not stopped (CPU random streams
        included), written atomically after each validation."""
        state = {"key": self._progress_key(), "epoch": epoch, "model": selected.state_dict(), "opt": opt.state_dict(),
                 "best": best, "best_state": best_state, "best_epoch": best_epoch, "history": self.history["static"],
                 "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
                 "negatives_gen": self.negatives_gen.get_state(), "torch_rng": torch.get_rng_state()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _load_progress(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        if saved["key"] != self._progress_key():
            log.warning("not resuming from %s: it was saved for other data or settings", path)
            return None
        self.history["static"] = saved["history"]
        self.rng.bit_generator.state = saved["rng"]
        self.torch_gen.set_state(saved["torch_gen"])
        self.negatives_gen.set_state(saved["negatives_gen"])
        torch.set_rng_state(saved["torch_rng"])
        return saved

    def train_static(self) -> DeviceModel:
        cfg, dev = self.cfg, self.torch_device
        model = DeviceModel(self.model_cfg).to(dev)

        def step(batch) -> torch.Tensor:
            inp, tgt, own = (t.to(dev) for t in batch)
            masks = self._random_masks(model, len(inp)) if self.rng.random() < cfg.slim_train_prob else None
            states = model.user_states(inp, None, masks)  # (B, L, d)
            return sequence_loss(self.loss_cfg, states, model.item_emb.weight, tgt, own, self.data.n_items,
                                 self.negatives_gen)

        protocol = "both" if self.cfg.valid_full else cfg.select
        self._fit("static", model, list(model.parameters()), cfg.lr, self._static_batches,
                  -(-len(self.static_seqs) // cfg.batch_size), step, cfg.epochs, cfg.patience,
                  lambda: self._validate(Checkpoint("train", model), ["static"], protocol), model.train,
                  cfg.eval_every)
        return model.eval()

    def _random_masks(self, model: DeviceModel, batch: int) -> dict[str, torch.Tensor]:
        """Per-sample random subnets at one keep ratio drawn from KEEP_RATIOS."""
        ratio = float(self.rng.choice(KEEP_RATIOS))
        masks = {}
        for group, n in model.unit_groups().items():
            scores = torch.rand(batch, n, generator=self.torch_gen)
            top = scores.topk(max(1, round(ratio * n)), dim=-1).indices
            masks[group] = torch.zeros(batch, n).scatter_(-1, top, 1.0).to(self.torch_device)
        return masks

    # -- stage 2 ----------------------------------------------------------------------------------
    def _generator_batches(self, window: int):
        """(window, device inputs, targets with only post-cut positions kept) per batch."""
        L, S = self.model_cfg.max_len, self.cfg.horizon
        h = self.cfg.gen_holdout
        for idx in self._batch_order(self.train_seqs, self.cfg.gen_batch_size):
            windows, inputs, targets = [], [], []
            for i in idx:
                s = self.train_seqs[i]
                low = max(1, len(s) - h) if h else 1  # with a holdout, only its items are targets
                cut = int(self.rng.integers(low, len(s)))  # the window is s[:cut]
                end = min(len(s), cut + S)
                windows.append(s[:cut])
                inputs.append(s[:end - 1])
                t = s[1:end].copy()
                t[: cut - 1] = 0  # targets before the cut would leak into the window
                targets.append(t)
            yield window_batch(windows, window), left_pad(inputs, L, trim=True), left_pad(targets, L, trim=True)

    def train_generator(self, model: DeviceModel) -> Generator:
        cfg, dev = self.cfg, self.torch_device
        gcfg = GeneratorConfig(n_items=self.data.n_items, slot_shapes=model.slot_shapes(),
                               unit_groups=model.unit_groups(), item_dim=model.cfg.hidden, **self.gen_overrides)
        gen = Generator(gcfg).to(dev)
        if gcfg.shared_items:
            gen.share_item_embeddings(model.item_emb.weight)
        params = [p for p in gen.parameters() if p.requires_grad]
        if cfg.joint:
            params += list(model.parameters())
        else:
            model.requires_grad_(False)
        # Selection: the generator makes deltas and subnets, so it is judged on both when it learns both.
        selection = ["generated"] + (["slimmed@0.5"] if cfg.slim_prob > 0 else [])

        def step(batch) -> torch.Tensor:
            win, inp, tgt = (t.to(dev) for t in batch)
            out = gen(win)
            masks = None
            if self.rng.random() < cfg.slim_prob:
                masks = out.masks(float(self.rng.choice(KEEP_RATIOS)), straight_through=True)
            states = model.user_states(inp, out.adapters, masks)  # (B, L, d)
            return sequence_loss(self.loss_cfg, states, model.item_emb.weight, tgt, torch.cat([inp, tgt], 1),
                                 self.data.n_items, self.negatives_gen)

        def train_modes(on: bool) -> None:
            gen.train(on)
            model.train(on and cfg.joint)

        train_modes(False)
        self._fit("generator", gen, params, cfg.gen_lr, lambda: self._generator_batches(gcfg.window),
                  -(-len(self.train_seqs) // cfg.gen_batch_size), step, cfg.gen_epochs, cfg.gen_patience,
                  lambda: self._validate(Checkpoint("train", model, gen), selection, cfg.select), train_modes)
        model.requires_grad_(True)
        return gen.eval()

    def _validate(self, ckpt: Checkpoint, variants: list[str], protocol: str) -> dict[str, float]:
        """Validation NDCG@10 per protocol (averaged over `variants`, each over the validation users),
        and under "select" the one early stopping maximises."""
        per_variant = self.evaluator(ckpt, self.data, self.valid_users, "valid", variants, protocol=protocol)
        scores = {}
        for name, metric in (("ndcg@10", "ndcg@10"), ("full:ndcg@10", FULL_PREFIX + "ndcg@10")):
            if metric in per_variant[variants[0]]:
                scores[name] = float(np.mean([np.mean(per_variant[v][metric]) for v in variants]))
        scores["select"] = scores["full:ndcg@10" if self.cfg.select == "full" else "ndcg@10"]
        return scores


def train(data: InteractionLog, out: str, model_cfg: DeviceModelConfig, cfg: TrainConfig,
          gen_cfg: dict | None = None, stages: tuple[str, ...] = ("static", "generator")) -> Checkpoint:
    """Run the stages and return the checkpoint (the caller saves it)."""
    from paramcast.cloud.evaluate import per_user_metrics

    t0 = time.perf_counter()
    progress = Path(out) / "static-progress.pt" if cfg.resume else None
    trainer = Trainer(data, model_cfg, gen_cfg or {}, cfg, per_user_metrics, progress)
    model = trainer.train_static()
    t_static = time.perf_counter() - t0
    gen = trainer.train_generator(model) if "generator" in stages else None
    meta = {
        "data": {"name": data.name, "source": data.source, "n_items": data.n_items, "users": data.n_users,
                 "interactions": data.n_interactions},
        "split": {"cold_fraction": cfg.cold_fraction, "seed": cfg.seed,
                  "cold_users": [data.user_raw_ids[u] for u in trainer.cold]},
        "train_config": cfg.to_dict(),
        "history": trainer.history,
        "best_epoch": trainer.best_epoch,
        "loss": trainer.loss_cfg.to_dict(),
        "seconds": {"static": t_static, "total": time.perf_counter() - t0},
        "torch_threads": trainer.threads,
        "cpu_count": os.cpu_count(),
    }
    model_id = f"sasrec-{data.name}"
    return Checkpoint(model_id, model.cpu(), gen.cpu() if gen is not None else None, meta)



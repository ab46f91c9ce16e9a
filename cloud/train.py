"""Training: the static device model first, then the generator with the static weights frozen.

Stage 1 trains SASRec with softmax cross-entropy over the catalogue (or over shared sampled
negatives for very large catalogues); Klenitskiy & Vasilev (RecSys 2023) showed this reaches the
original binary-loss quality in far fewer epochs. Stage 2 is DUET's setting: the device model is
frozen and the generator learns to emit deltas (and masks) from a window of the user's past that
ends at a random cut; the loss is the next items after the cut, so the generator learns what a
fresh or slightly stale delta should do. Both stages stop early on validation NDCG@10 and keep the
best weights; runs are reproducible for a seed.
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

from paramcast.cloud import distributed
from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.generator import KEEP_RATIOS, Generator, GeneratorConfig, window_batch
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
        self.dist = distributed.context(cfg.device)  # distributed: a world of one outside torchrun
        self.torch_device = self.dist.torch_device(resolve_device(cfg.device))
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
        self.evaluator = evaluator  # (bundle, users, stage, variants) -> {variant: per-user metrics}
        self.rng = np.random.default_rng(self.dist.rank_seed(cfg.seed))  # distributed: per-rank steps
        self.torch_gen = torch.Generator().manual_seed(self.dist.rank_seed(cfg.seed))
        self.history: dict[str, list] = {"static": [], "generator": []}

    # -- stage 1 ----------------------------------------------------------------------------------
    def _batch_order(self, seqs: list[np.ndarray], bs: int) -> list[np.ndarray]:
        """Shuffled batches of similar-length sequences: a random permutation is cut into chunks of
        32 batches, each chunk is sorted by length, and batch order is shuffled again. Short
        sequences then pad to their own length instead of max_len (most of a sparse log's batch
        would otherwise be padding)."""
        lengths = np.array([len(s) for s in seqs])
        rng = self.dist.shared_rng(self.rng)  # distributed: every rank shuffles alike, then takes its share
        bs = self.dist.local_batch_size(bs)
        order = rng.permutation(len(seqs))
        chunk = 32 * bs
        batches: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i:i + bs] for i in range(0, len(part), bs))
        return self.dist.shard([batches[i] for i in rng.permutation(len(batches))])

    def _static_batches(self):
        L = self.model_cfg.max_len
        for idx in self._batch_order(self.static_seqs, self.cfg.batch_size):
            x = left_pad([self.static_seqs[i] for i in idx], L + 1, trim=True)  # (B, T+1)
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
            bar = tqdm(batches(), total=n_batches, desc=f"{stage} epoch {epoch}",
                       disable=not (cfg.progress and self.dist.is_writer), leave=False)
            steps = 0
            for batch in bar:
                loss = step(batch)
                steps += 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            train_modes(False)
            epoch_loss = self.dist.mean(total / max(steps, 1))  # distributed: averaged over ranks
            score = validate()
            seconds = time.perf_counter() - t0
            self.history[stage].append({"epoch": epoch, "loss": epoch_loss, "valid_ndcg@10": score,
                                        "seconds": seconds})
            log.info("%s epoch %d loss %.4f valid ndcg@10 %.4f (best %.4f, at start %.4f, %.1fs)", stage, epoch,
                     epoch_loss, score, max(best, score), untrained, seconds)
            if score > best:
                best, best_state, bad = score, copy.deepcopy(selected.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
        selected.load_state_dict(best_state)
        return best

    def train_static(self) -> DeviceModel:
        cfg, dev = self.cfg, self.torch_device
        model = DeviceModel(self.model_cfg).to(dev)

        def step(batch) -> torch.Tensor:
            inp, tgt = (t.to(dev) for t in batch)
            masks = self._random_masks(model, len(inp)) if self.rng.random() < cfg.slim_train_prob else None
            states = model.user_states(inp, None, masks)  # (B, L, d)
            keep = tgt > 0
            return _ce_loss(states[keep], tgt[keep], model.item_emb.weight, cfg, self.data.n_items, self.torch_gen)

        ddp_step = self.dist.data_parallel(step, model)  # distributed: gradients averaged across ranks
        self._fit("static", model, list(model.parameters()), cfg.lr, self._static_batches,
                  -(-len(self.static_seqs) // cfg.batch_size), ddp_step, cfg.epochs, cfg.patience,
                  lambda: self._valid_ndcg(Checkpoint("train", model), ["static"]), model.train)
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
            keep = tgt > 0
            return _ce_loss(states[keep], tgt[keep], model.item_emb.weight, cfg, self.data.n_items, self.torch_gen)

        def train_modes(on: bool) -> None:
            gen.train(on)
            model.train(on and cfg.joint)

        train_modes(False)
        ddp_step = self.dist.data_parallel(step, gen, model, sometimes_unused=True)  # distributed: averaged gradients
        self._fit("generator", gen, params, cfg.gen_lr, lambda: self._generator_batches(gcfg.window),
                  -(-len(self.train_seqs) // cfg.gen_batch_size), ddp_step, cfg.gen_epochs, cfg.gen_patience,
                  lambda: self._valid_ndcg(Checkpoint("train", model, gen), selection), train_modes)
        model.requires_grad_(True)
        return gen.eval()

    def _valid_ndcg(self, ckpt: Checkpoint, variants: list[str]) -> float:
        """Mean validation NDCG@10 over `variants` (each averaged over the validation users)."""
        users = self.valid_users
        if self.dist.enabled and len(users) >= self.dist.world:  # distributed: each rank scores its share
            users = np.asarray(self.dist.shard(users))
        per_variant = self.evaluator(ckpt, self.data, users, "valid", variants)
        # distributed: means over every rank's users, so all ranks see the same score
        return float(np.mean(self.dist.means([per_variant[v]["ndcg@10"] for v in variants])))


def train(data: InteractionLog, out: str, model_cfg: DeviceModelConfig, cfg: TrainConfig,
          gen_cfg: dict | None = None, stages: tuple[str, ...] = ("static", "generator")) -> Checkpoint:
    """Run the stages and return the checkpoint (the caller saves it)."""
    from paramcast.cloud.evaluate import per_user_metrics

    t0 = time.perf_counter()
    trainer = Trainer(data, model_cfg, gen_cfg or {}, cfg, per_user_metrics)
    model = trainer.train_static()
    t_static = time.perf_counter() - t0
    gen = trainer.train_generator(model) if "generator" in stages else None
    meta = {
        "data": {"name": data.name, "source": data.source, "n_items": data.n_items, "users": data.n_users,
                 "interactions": data.n_interactions},
        "item_raw_ids": data.item_raw_ids,  # the item vocabulary the device package carries
        "split": {"cold_fraction": cfg.cold_fraction, "seed": cfg.seed,
                  "cold_users": [data.user_raw_ids[u] for u in trainer.cold]},
        "train_config": cfg.to_dict(),
        "history": trainer.history,
        "seconds": {"static": t_static, "total": time.perf_counter() - t0},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if trainer.dist.enabled:  # distributed: the job's shape, and proof that the ranks ended equal
        trainer.dist.check_in_sync(*(m for m in (model, gen) if m is not None))
        meta["distributed"] = trainer.dist.describe()
    model_id = f"sasrec-{data.name}"
    return Checkpoint(model_id, model.cpu(), gen.cpu() if gen is not None else None, meta)



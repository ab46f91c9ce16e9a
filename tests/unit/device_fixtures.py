"""A tiny device model sized for MovieLens 100K, its exported package, and real users: shared by
the export, runtime and no-torch tests (exporting takes a few seconds, so it happens once)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad, slice_adapters
from paramcast.common.bundle import DeltaBundle
from paramcast.common.data import load_interactions

ML_100K_ITEMS = 1682
TINY = DeviceModelConfig(n_items=ML_100K_ITEMS, hidden=16, n_blocks=2, n_heads=2, ffn_units=24, head_units=32,
                         max_len=20, dropout=0.5)
RANK = 4
CLOUD_ITEMS = 12  # width of the tiny model's cloud item table (the head.cloud slot)


@functools.cache
def tiny_checkpoint() -> Checkpoint:
    """Random weights, every parameter perturbed so layer norms and biases are not at their
    identity/zero init (parity must hold for the whole computation, not a trivial part of it), and
    a random cloud item table, so every slot a trained model ships (head.cloud too) is exercised."""
    torch.manual_seed(7)
    model = DeviceModel(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.item_emb.weight[0].zero_()  # the padding item stays the zero vector
        model.carry_cloud_items(0.3 * torch.randn(TINY.n_items + 1, CLOUD_ITEMS))
    return Checkpoint("tiny-ml100k", model.eval())


@functools.cache
def tiny_package() -> Path:
    from paramcast.cloud.export import export_package

    root = Path(tempfile.mkdtemp(prefix="paramcast-pkg-"))
    atexit.register(shutil.rmtree, root, True)
    return export_package(tiny_checkpoint(), root / "pkg")


def copy_package(dst: Path) -> Path:
    """A private copy of the tiny package (for tests that tamper with files)."""
    return Path(shutil.copytree(tiny_package(), dst))


def real_users(data: Path, n: int = 6, n_candidates: int = 101, seed: int = 0):
    """`n` MovieLens 100K users from the shortest to the longest history: (history, candidates)
    pairs, the history being all but the last item and the candidates the last item plus items
    drawn at random (the SASRec protocol's shape)."""
    log = load_interactions(data / "ml-100k")
    assert log.n_items == ML_100K_ITEMS
    order = np.argsort(log.lengths(), kind="stable")
    picks = order[np.linspace(0, len(order) - 1, n).round().astype(int)]  # spread over lengths
    rng = np.random.default_rng(seed)
    users = []
    for u in picks:
        seq = log.sequences[u]
        negatives = rng.integers(1, log.n_items + 1, n_candidates - 1)
        users.append((seq[:-1].astype(np.int64), np.concatenate([seq[-1:], negatives]).astype(np.int64)))
    return users


def random_bundle(seed: int = 0, masks: dict | None = None, scale: float = 0.3) -> DeltaBundle:
    """Random rank-RANK factors for every slot of the tiny model (what a generator would emit)."""
    rng = np.random.default_rng(seed)
    ckpt = tiny_checkpoint()
    factors = {
        slot: (rng.normal(0, scale, (d_in, RANK)), rng.normal(0, scale, (RANK, d_out)))
        for slot, (d_in, d_out) in ckpt.device_model.slot_shapes().items()
    }
    return DeltaBundle(ckpt.model_id, ckpt.base_version, factors, masks or {})


def random_keep(ratio: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Per unit group, a bool mask keeping round(ratio * n_units) units chosen at random."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group, n in tiny_checkpoint().device_model.unit_groups().items():
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, max(1, round(ratio * n)), replace=False)] = True
        keep[group] = mask
    return keep


def torch_scores(users, factors=None, keep=None) -> np.ndarray:
    """What PyTorch computes for (history, candidates) pairs on the tiny model: with the adapter
    `factors` when given, and the slimmed model and sliced factors when `keep`."""
    model = tiny_checkpoint().device_model
    history = left_pad([np.asarray(h) for h, _ in users], TINY.max_len)  # (B, L)
    candidates = torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for _, c in users]))  # (B, C)
    adapters = {s: (torch.from_numpy(a)[None], torch.from_numpy(b)[None])  # (1, d_in, r), (1, r, d_out)
                for s, (a, b) in (factors or {}).items()}
    if keep:
        keep_t = {g: torch.as_tensor(np.asarray(m)) for g, m in keep.items()}
        model, adapters = model.slimmed(keep_t), slice_adapters(adapters, keep_t)
    with torch.no_grad():
        return model.score(history, candidates, adapters or None).numpy()

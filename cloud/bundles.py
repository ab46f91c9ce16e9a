"""Behaviour windows into DeltaBundles: the one path the service, the evaluation and the
simulation all use, so what a device receives over the wire is what the benchmarks measured."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.generator import window_batch
from paramcast.cloud.model import left_pad
from paramcast.cloud.oracle import cloud_log_probs, fit_factors
from paramcast.common.bundle import BundleBatch, DeltaBundle
from paramcast.common.errors import InvalidInput


def check_window(window: Sequence[int] | np.ndarray, n_items: int, max_window: int,
                 field: str = "window") -> np.ndarray:
    """Validate one behaviour window: 1-D int ids in [1, n_items], at most `max_window` long."""
    arr = np.asarray(window)
    if arr.ndim != 1:
        raise InvalidInput(field, f"must be a flat list of item ids, got shape {arr.shape}")
    if len(arr) > max_window:
        raise InvalidInput(field, f"has {len(arr)} items; at most {max_window} are accepted")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInput(field, "item ids must be integers")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 1 or arr.max() > n_items):
        bad = int(arr[(arr < 1) | (arr > n_items)][0])
        raise InvalidInput(field, f"item id {bad} is outside [1, {n_items}]")
    return arr


@torch.no_grad()
def generate_parameters(ckpt: Checkpoint, windows: Sequence[np.ndarray], keep_ratio: float | None = None,
                        torch_device: torch.device | str = "cpu", refine_steps: int | None = None):
    """One batched generator pass -> (adapters, masks) as torch tensors with a leading device axis.

    `masks` is None when `keep_ratio` is None or >= 1 (no slimming). `refine_steps` (default: the
    generator's own, GeneratorConfig.refine_steps) refines the factors against the cloud model,
    under the masks a slimmed device will run."""
    gen = ckpt.generator
    if gen is None:
        raise InvalidInput("model", f"model {ckpt.model_id} has no generator; train it with both stages")
    windows = list(windows)
    win = window_batch(windows, gen.cfg.window).to(torch_device)  # (B, <= N)
    model = ckpt.device_model
    # The device model's own state for the window it will run on: what the delta is added to.
    device_window = left_pad(windows, model.cfg.max_len, trim=True).to(torch_device)
    device_state = model.base_state(device_window)
    out = gen(win, device_state)  # device_state: (B, d)
    masks = out.masks(keep_ratio) if keep_ratio is not None and keep_ratio < 1.0 else None
    steps = gen.cfg.refine_steps if refine_steps is None else refine_steps
    if steps <= 0:
        return out.adapters, masks
    with torch.enable_grad():  # gradients reach the factors only: both models stay frozen
        # The generator's encoder is the cloud model; both windows end at the same item, so their
        # last P positions are the same P prefixes of the history.
        positions = min(gen.cfg.refine_positions, win.shape[1], device_window.shape[1])
        teacher = cloud_log_probs(gen.encoder, win, positions)
        adapters = fit_factors(model, device_window, teacher, out.adapters, steps, gen.cfg.refine_lr, masks)
    return adapters, masks


def generate_batch(ckpt: Checkpoint, windows: Sequence[np.ndarray], keep_ratio: float | None = None,
                   torch_device: torch.device | str = "cpu", ttl_ms: int = 0) -> BundleBatch:
    """Batched generation -> the bundles of all windows stacked along a leading axis (fp32 factors),
    ready for the codec's batch encoder (`BundleBatch.encoded`) as they come off the generator."""
    adapters, masks = generate_parameters(ckpt, windows, keep_ratio, torch_device)
    factors = {slot: (a.float().cpu().numpy(), b.float().cpu().numpy())  # (B, d, r), (B, r, k)
               for slot, (a, b) in adapters.items()}
    keep = {g: m.cpu().numpy() > 0.5 for g, m in masks.items()} if masks else {}  # group -> (B, n_units)
    return BundleBatch.fresh(ckpt.model_id, ckpt.base_version, factors, keep, ttl_ms=ttl_ms)


def generate_bundles(ckpt: Checkpoint, windows: Sequence[np.ndarray], keep_ratio: float | None = None,
                     torch_device: torch.device | str = "cpu", ttl_ms: int = 0) -> list[DeltaBundle]:
    """Batched generation -> one DeltaBundle per window (fp32 factors; the codec encodes them)."""
    return generate_batch(ckpt, windows, keep_ratio, torch_device, ttl_ms).unstack()

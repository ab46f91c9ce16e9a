"""The oracle delta: per-user factors fitted directly against the cloud model's next-item distribution.

It answers what the delta format can carry at all, whatever the generator: for each history the
factors of the chosen slots at rank r are optimised, by gradient descent on the frozen device
model, so that the device with that delta ranks the catalogue as the cloud model does (KL over the
catalogue; the true next item is never used). `paramcast evaluate --variants ...,oracle` scores it
beside `generated`; tools/bench_oracle.py sweeps slots and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paramcast.cloud.cloud_model import CloudModel
from paramcast.cloud.model import Adapters, DeviceModel, Masks, left_pad


def cloud_log_probs(cloud: CloudModel, histories: list | torch.Tensor, positions: int = 0) -> torch.Tensor:
    """(U, n_items) log-probabilities of the cloud model's next item after each history (a list, or
    its window as a left-padded (U, N) tensor); with `positions` P, (U, P, n_items) after each of
    the history's last P prefixes."""
    if not isinstance(histories, torch.Tensor):
        histories = left_pad(histories, cloud.cfg.max_len, trim=True)
    with torch.no_grad():
        states = cloud.encode(histories)  # (U, N, D)
        state = states[:, -positions:] if positions else states[:, -1]  # (U, P, D) or (U, D)
        return F.log_softmax((state @ cloud.output_table().T)[..., 1:], dim=-1)


def fit_oracle(model: DeviceModel, seq: torch.Tensor, teacher_logp: torch.Tensor, slots: list[str], rank: int,
               steps: int = 300, lr: float = 0.05, seed: int = 0) -> Adapters:
    """Per-user factors (U users at once; each user's delta is its own) minimising KL(teacher || device),
    from the static model: A random, B zero."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model.slot_shapes()
    U = seq.shape[0]
    start = {slot: (torch.randn(U, shapes[slot][0], rank, generator=gen) / shapes[slot][0] ** 0.5,  # (U, d_in, r)
                    torch.zeros(U, rank, shapes[slot][1]))  # (U, r, d_out)
             for slot in slots}
    return fit_factors(model, seq, teacher_logp, start, steps, lr)


def fit_factors(model: DeviceModel, seq: torch.Tensor, teacher_logp: torch.Tensor, start: Adapters, steps: int,
                lr: float = 0.05, masks: Masks | None = None) -> Adapters:
    """`start`'s factors after `steps` of Adam on KL(teacher || device with them), every user's on
    its own (the loss is a sum over users). `teacher_logp` is (U, n_items) for each history's last
    position, or (U, P, n_items) for its last P positions (the KL averaged over those holding an
    item): a delta fitted over several states of the window keeps fitting as the window moves on.
    The device model stays frozen; only head slots are fitted, so its backbone runs once."""
    assert all(slot.startswith("head.") for slot in start), "fitting runs the backbone once: head slots only"
    teacher = teacher_logp[:, None] if teacher_logp.dim() == 2 else teacher_logp  # (U, P, n_items)
    P = teacher.shape[1]
    assert P <= seq.shape[1], f"{P} positions fitted in a window of {seq.shape[1]}"
    real = (seq[:, -P:] > 0).to(teacher.dtype)  # (U, P)
    weight = real / real.sum(1, keepdim=True).clamp(min=1.0)
    params = {slot: (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
              for slot, (a, b) in start.items()}
    opt = torch.optim.Adam([t for pair in params.values() for t in pair], lr=lr)
    with torch.no_grad():
        backbone = model.encode(seq, masks)[:, -P:]  # untouched by head deltas: run it once
    table = model.output_table()
    target = teacher.exp()
    for _ in range(steps):
        user = model.head(backbone, params, masks)  # (U, P, d)
        logp = F.log_softmax((user @ table.T)[..., 1:], dim=-1)  # (U, P, n_items)
        kl = (target * (teacher - logp)).sum(-1)  # (U, P)
        # A mean over users: each user's factors see their own KL (Adam's steps are scale-free).
        loss = (kl * weight).sum() / len(kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {slot: (a.detach(), b.detach()) for slot, (a, b) in params.items()}


def fit_state_offset(model: DeviceModel, seq: torch.Tensor, teacher_logp: torch.Tensor, steps: int = 300,
                     lr: float = 0.05) -> torch.Tensor:
    """Per-user (U, d) vector added to the device's user state, fitted the same way (against the
    device's own item table: a cloud item table's part of the scores stays zero)."""
    with torch.no_grad():
        base = model.base_state(seq)  # (U, d)
    offset = torch.zeros_like(base).requires_grad_()
    opt = torch.optim.Adam([offset], lr=lr)
    table = model.item_emb.weight
    for _ in range(steps):
        logp = F.log_softmax(((base + offset) @ table.T)[:, 1:], dim=-1)
        loss = F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return offset.detach()

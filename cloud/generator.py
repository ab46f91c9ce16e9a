"""The cloud hypernetwork: behaviour window -> per-device low-rank deltas and slimming masks.

DUET (WWW 2023) generates a device model's parameters from the sample it will serve; APG and
MetaNetwork keep the generated part small with low-rank factors; DIET (KDD 2024) picks a per-device
subnet. Here one encoder reads the window (the last N items the device saw), and per-slot heads
emit A (d_in x r), B (r x d_out) with W = W0 + A B, plus per-group unit scores whose top units at a
keep ratio form the device's subnet. Nothing here looks at a user id: a user never seen in training
gets an update from the items alone.

Shapes: B = devices in a batch, N = window length, g = generator width, r = rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from paramcast.cloud.model import Adapters, Masks, left_pad

KEEP_RATIOS = (0.25, 0.5, 0.75)  # subnet sizes trained for and reported


@dataclass
class GeneratorConfig:
    n_items: int
    slot_shapes: dict[str, tuple[int, int]]  # slot -> (d_in, d_out), from DeviceModel.slot_shapes()
    unit_groups: dict[str, int]  # group -> n_units, from DeviceModel.unit_groups()
    window: int = 50
    width: int = 64
    # Item embeddings: a frozen copy of the device model's table (dimension `item_dim`) projected to
    # `width`. The generator then learns only how to read a window, not what items are, which is
    # what keeps it from overfitting the few sequences per user that training has.
    item_dim: int = 64
    shared_items: bool = True  # False: learn a table of its own (item_dim wide) from scratch
    n_layers: int = 1
    n_heads: int = 2
    rank: int = 4
    dropout: float = 0.3

    def __post_init__(self) -> None:  # JSON round trips turn tuples into lists
        self.slot_shapes = {k: tuple(v) for k, v in self.slot_shapes.items()}  # type: ignore[misc]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generated:
    adapters: Adapters  # slot -> (A (B, d_in, r), B (B, r, d_out))
    unit_scores: dict[str, torch.Tensor]  # group -> (B, n_units) logits

    def masks(self, keep_ratio: float, straight_through: bool = False) -> Masks:
        """Hard top-k masks at `keep_ratio`; with `straight_through`, gradients reach the scores."""
        out = {}
        for group, logits in self.unit_scores.items():
            n_keep = max(1, round(keep_ratio * logits.shape[-1]))
            top = logits.topk(n_keep, dim=-1).indices
            hard = torch.zeros_like(logits).scatter_(-1, top, 1.0)  # (B, n)
            if straight_through:
                soft = torch.sigmoid(logits)
                hard = hard + soft - soft.detach()
            out[group] = hard
        return out


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.width
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.item_dim, padding_idx=0)
        self.item_emb.weight.requires_grad_(not cfg.shared_items)
        if not cfg.shared_items:
            nn.init.normal_(self.item_emb.weight, std=cfg.item_dim**-0.5)
        self.in_proj = nn.Linear(cfg.item_dim, g)
        self.pos_emb = nn.Embedding(cfg.window, g)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            g, cfg.n_heads, dim_feedforward=2 * g, dropout=cfg.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(2 * g)
        # Factor heads. B-heads start at zero so an untrained generator reproduces the static model
        # exactly (LoRA's initialisation, per sample).
        self.a_heads = nn.ModuleDict()
        self.b_heads = nn.ModuleDict()
        for slot, (d_in, d_out) in cfg.slot_shapes.items():
            key = slot.replace(".", "_")
            self.a_heads[key] = nn.Linear(2 * g, d_in * cfg.rank)
            b_head = nn.Linear(2 * g, cfg.rank * d_out)
            nn.init.zeros_(b_head.weight)
            nn.init.zeros_(b_head.bias)
            self.b_heads[key] = b_head
        self.unit_heads = nn.ModuleDict(
            {group.replace(".", "_"): nn.Linear(2 * g, n) for group, n in cfg.unit_groups.items()}
        )

    @torch.no_grad()
    def share_item_embeddings(self, table: torch.Tensor) -> None:
        """Copy the device model's (n_items + 1, item_dim) item table in (it stays frozen)."""
        assert table.shape == self.item_emb.weight.shape, (table.shape, self.item_emb.weight.shape)
        self.item_emb.weight.copy_(table)

    def context(self, window: torch.Tensor) -> torch.Tensor:
        """(B, N) item ids, left-padded -> (B, 2g): last-position state and mean over the window."""
        B, N = window.shape
        assert N == self.cfg.window, f"window length {N} != {self.cfg.window}"
        pad = window == 0  # (B, N)
        pos = torch.arange(N, device=window.device)
        x = self.in_proj(self.item_emb(window)) + self.pos_emb(pos)  # (B, N, g)
        # A fully padded window (no history yet) would give NaN attention; let it see its last slot.
        pad = pad.clone()
        pad[:, -1] = False
        x = self.encoder(x, src_key_padding_mask=pad)  # (B, N, g)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        mean = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, g)
        return self.ln(torch.cat([x[:, -1], mean], dim=-1))  # (B, 2g)

    def forward(self, window: torch.Tensor) -> Generated:
        c = self.context(window)
        B, r = c.shape[0], self.cfg.rank
        adapters: Adapters = {}
        for slot, (d_in, d_out) in self.cfg.slot_shapes.items():
            key = slot.replace(".", "_")
            a = self.a_heads[key](c).view(B, d_in, r) / math.sqrt(d_in)  # (B, d_in, r)
            b = self.b_heads[key](c).view(B, r, d_out)  # (B, r, d_out)
            adapters[slot] = (a, b)
        scores = {group: self.unit_heads[group.replace(".", "_")](c) for group in self.cfg.unit_groups}
        return Generated(adapters, scores)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def generated_parameters_per_device(self) -> int:
        return sum(self.cfg.rank * (d_in + d_out) for d_in, d_out in self.cfg.slot_shapes.values())

    def flops_per_bundle(self) -> int:
        """Multiply-adds x2 of one generation (input projection, encoder layers, heads); lookups are free."""
        g, N, L = self.cfg.width, self.cfg.window, self.cfg.n_layers
        proj = 2 * N * self.cfg.item_dim * g
        per_layer = 2 * N * (4 * g * g + 2 * N * g + 2 * g * 2 * g)  # qkv+proj, attention, ffn
        heads = 2 * 2 * g * sum(self.cfg.rank * (a + b) for a, b in self.cfg.slot_shapes.values())
        units = 2 * 2 * g * sum(self.cfg.unit_groups.values())
        return int(proj + L * per_layer + heads + units)


def window_batch(histories: list, window: int) -> torch.Tensor:
    """Last `window` items of each history, left-padded -> (B, window) int64."""
    return left_pad(histories, window)



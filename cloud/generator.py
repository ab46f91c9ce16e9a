"""The cloud hypernetwork: what the cloud model knows about a user -> per-device deltas and masks.

DUET (WWW 2023) generates a device model's parameters from the sample it will serve; APG and
MetaNetwork keep the generated part small with low-rank factors; DIET (KDD 2024) picks a per-device
subnet. A generator that reads only the device's window with a model no stronger than the device's
has nothing to add (measured: generated - static within noise), so this one is built on the cloud
model: its encoder reads the user's whole history (up to `window` items, with the items' side
features) and its last state, together with the device model's own user state for the same window
(the cloud can always compute it) and the cloud's expected next item in the device's item space
(the cloud's next-item distribution averaged over the frozen device item table: the direction the
device's user state should move in, given to the MLP instead of learnt by it), feeds a small MLP
whose per-slot heads emit A (d_in x r) and B (r x d_out), W = W0 + A B, and per-group unit scores
whose top units at a keep ratio form the device's subnet. When the device model carries the cloud
model's item table, one of those slots is `head.cloud` (cloud/model.py): its factors map the
device's user state into the cloud's item space, so a bundle can say which items the cloud model
rates higher, not only where the device's own state should move. It is trained by distillation (the
generator stage of cloud/train.py): the device model plus the delta, on the device's short window,
should rank items as the cloud model does. Nothing here looks at a
user id: a user never seen in training gets an update from its history alone.

Shapes: B = devices in a batch, N = history length the generator reads, D = cloud width,
d = device width, w = MLP width, r = rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.model import Adapters, DeviceModel, Masks, left_pad

KEEP_RATIOS = (0.25, 0.5, 0.75)  # subnet sizes trained for and reported


@dataclass
class GeneratorConfig:
    n_items: int
    slot_shapes: dict[str, tuple[int, int]]  # slot -> (d_in, d_out), from DeviceModel.slot_shapes()
    unit_groups: dict[str, int]  # group -> n_units, from DeviceModel.unit_groups()
    cloud: dict = field(default_factory=dict)  # the encoder's CloudModelConfig, as a dict
    device_dim: int = 64  # width of the device model's user state, the generator's second input
    # Width and dropout: the generator learns from a few thousand cut points of a few hundred users
    # and overfits them within epochs; on ml-100k validation, width 128 / dropout 0.3 against 256 /
    # 0.1 held generated - static at +0.0248 against +0.0256 with every user in training, and raised
    # it from +0.0064 (early stopping kept epoch 1) to +0.0161 with 40% of the users held out.
    width: int = 128
    rank: int = 4
    dropout: float = 0.3
    # False: the cloud encoder stays the frozen teacher; True: distillation fine-tunes a copy of it.
    tune_encoder: bool = False
    # The cloud's expected next item in device item space as a third input (measured on ml-100k
    # validation: see BENCHMARKS.md, generator inputs).
    cloud_expectation: bool = True
    # The direction in which the device's distillation loss falls fastest at its own state as a
    # fourth input: E'(p_cloud - p_device) over the device item table E, the negative gradient of
    # KL(cloud || device) with respect to the device's user state (needs cloud_expectation).
    kl_gradient: bool = False
    # Refinement at generation time: the generated factors then `refine_steps` of Adam (at
    # `refine_lr`) on the distillation loss at the window's last position, the cloud model's
    # next-item distribution as the target (cloud/oracle.py fit_factors). 0: the MLP's output as is.
    refine_steps: int = 0
    refine_lr: float = 0.05
    refine_positions: int = 1  # the window's last positions whose cloud distributions the delta is fitted to

    def __post_init__(self) -> None:  # JSON round trips turn tuples into lists
        self.slot_shapes = {k: tuple(v) for k, v in self.slot_shapes.items()}  # type: ignore[misc]
        if self.kl_gradient and not self.cloud_expectation:
            raise ValueError("kl_gradient needs cloud_expectation (the cloud's side of the gradient)")

    @property
    def n_inputs(self) -> int:
        """Width of the MLP's input: the cloud state, the device state, and the optional d-vectors."""
        return int(self.cloud["hidden"]) + self.device_dim * (1 + self.cloud_expectation + self.kl_gradient)

    @property
    def window(self) -> int:
        """History items a request's window is cut to: what the cloud encoder reads."""
        return int(self.cloud["max_len"])

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
    device_items: torch.Tensor | None  # a buffer: (n_items + 1, d) with the cloud expectation, else None

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = CloudModel(CloudModelConfig(**cfg.cloud))  # weights come from the cloud model
        self.encoder.requires_grad_(cfg.tune_encoder)
        d, w = cfg.device_dim, cfg.width
        n_in = cfg.n_inputs
        # The frozen device model's item table (set by build_generator), for the cloud's expectation.
        self.register_buffer("device_items", torch.zeros(cfg.n_items + 1, d) if cfg.cloud_expectation else None)
        self.ln_in = nn.LayerNorm(n_in)
        self.mlp = nn.Sequential(nn.Linear(n_in, w), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(w, w), nn.GELU())
        # Factor heads. B-heads start at zero so an untrained generator reproduces the static model
        # exactly (LoRA's initialisation, per sample).
        self.a_heads = nn.ModuleDict()
        self.b_heads = nn.ModuleDict()
        for slot, (d_in, d_out) in cfg.slot_shapes.items():
            key = slot.replace(".", "_")
            self.a_heads[key] = nn.Linear(w, d_in * cfg.rank)
            b_head = nn.Linear(w, cfg.rank * d_out)
            nn.init.zeros_(b_head.weight)
            nn.init.zeros_(b_head.bias)
            self.b_heads[key] = b_head
        self.unit_heads = nn.ModuleDict(
            {group.replace(".", "_"): nn.Linear(w, n) for group, n in cfg.unit_groups.items()}
        )

    @torch.no_grad()
    def load_encoder(self, cloud: CloudModel) -> None:
        """Start the encoder from the trained cloud model's weights (features included)."""
        self.encoder.load_state_dict(cloud.state_dict())

    def train(self, mode: bool = True) -> Generator:
        super().train(mode)
        if not self.cfg.tune_encoder:
            self.encoder.eval()  # a frozen teacher runs without dropout
        return self

    def context(self, window: torch.Tensor, device_state: torch.Tensor) -> torch.Tensor:
        """(B, N) history ids, left-padded, and (B, d) device user states -> (B, w)."""
        return self.mlp(self.ln_in(self.inputs(window, device_state)))

    def inputs(self, window: torch.Tensor, device_state: torch.Tensor) -> torch.Tensor:
        """What the MLP reads, (B, cfg.n_inputs): [cloud state, device state, cloud expectation,
        KL gradient direction], the last two when configured."""
        assert window.shape[1] <= self.cfg.window, f"window length {window.shape[1]} > {self.cfg.window}"
        with torch.set_grad_enabled(self.cfg.tune_encoder and torch.is_grad_enabled()):
            cloud_state = self.encoder.encode(window)[:, -1]  # (B, D)
        inputs = [cloud_state, device_state]
        if self.device_items is not None:
            items = self.device_items[1:]  # (n_items, d)
            p = torch.softmax(cloud_state @ self.encoder.output_table()[1:].T, dim=-1)  # (B, n_items)
            expected = p @ items  # (B, d)
            inputs.append(expected)
            if self.cfg.kl_gradient:
                q = torch.softmax(device_state @ items.T, dim=-1)  # (B, n_items): the device model's own
                inputs.append(expected - q @ items)
        return torch.cat(inputs, dim=-1)

    def forward(self, window: torch.Tensor, device_state: torch.Tensor) -> Generated:
        c = self.context(window, device_state)
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

    def flops_per_bundle(self, device_state_flops: int = 0) -> int:
        """Multiply-adds x2 of one generation: the encoder over a full window, the MLP, the heads,
        plus `device_state_flops` for the device model's state (DeviceModel.flops_per_user(0))."""
        D, d, w = self.encoder.cfg.hidden, self.cfg.device_dim, self.cfg.width
        n_in = self.cfg.n_inputs
        expectation = 2 * self.cfg.n_items * (D + d) if self.cfg.cloud_expectation else 0
        gradient = 2 * self.cfg.n_items * 2 * d if self.cfg.kl_gradient else 0
        mlp = 2 * (n_in * w + w * w) + expectation + gradient
        heads = 2 * w * sum(self.cfg.rank * (a + b) for a, b in self.cfg.slot_shapes.values())
        units = 2 * w * sum(self.cfg.unit_groups.values())
        return int(self.encoder.flops_per_request(0) + mlp + heads + units + device_state_flops
                   + self.refine_flops(self.cfg.refine_steps))

    def refine_flops(self, steps: int) -> int:
        """Multiply-adds x2 of `steps` refinement steps: the cloud's next-item distribution once
        (from the encoder's state), then per step the head and the catalogue scores, forward and
        backward (about three times the forward)."""
        if steps <= 0:
            return 0
        D, d, n = self.encoder.cfg.hidden, self.cfg.device_dim, self.cfg.n_items
        head = 2 * sum(a * b for a, b in self.cfg.slot_shapes.values())  # the head slots' base weights
        lowrank = 2 * sum(self.cfg.rank * (a + b) for a, b in self.cfg.slot_shapes.values())
        P = self.cfg.refine_positions
        return int(P * 2 * n * D + steps * 3 * P * (head + lowrank + 2 * n * d))


def build_generator(device_model: DeviceModel, cloud_model: CloudModel, **overrides) -> Generator:
    """A generator for `device_model`'s slots and groups whose encoder starts as `cloud_model`."""
    cfg = GeneratorConfig(n_items=device_model.cfg.n_items, slot_shapes=device_model.slot_shapes(),
                          unit_groups=device_model.unit_groups(), cloud=cloud_model.cfg.to_dict(),
                          device_dim=device_model.cfg.hidden, **overrides)
    gen = Generator(cfg).to(next(cloud_model.parameters()).device)
    gen.load_encoder(cloud_model)
    if gen.device_items is not None:
        with torch.no_grad():
            gen.device_items.copy_(device_model.item_emb.weight)
    return gen


def window_batch(histories: list, window: int) -> torch.Tensor:
    """Last `window` items of each history, left-padded to the longest kept one -> (B, <= window)
    int64. Positions are right-aligned, so trimming the padding changes no state, only the cost."""
    return left_pad(histories, window, trim=True)

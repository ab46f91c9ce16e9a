"""The device model every device runs: SASRec-style item sequence encoder + an adapter-ready head.

Read top to bottom: config, adapter slot, attention block, the model. Shapes use B = batch,
L = sequence length (always `max_len`, left-padded with item 0), d = hidden size, C = candidates,
m = head units, f = feed-forward units, r = adapter rank.

Personalisation hooks (what the cloud generator targets):
- adapter slots: `head.up` (d -> m) and `head.down` (m -> d); a slot's effective weight for sample
  b is `W0 + A[b] @ B[b]` with A (d_in x r) and B (r x d_out);
- with a cloud item table (`cloud_items` > 0, attached by `carry_cloud_items` before the generator
  is trained), a third slot `head.cloud` ((d + 1) -> k, base weight zero) maps the user state and a
  constant into the cloud model's item space, and an item's score gains that vector's dot product
  with the item's cloud vector. A head delta alone only moves the device's user state against the
  device's own item table; this slot lets a bundle carry what the cloud model knows about the
  items themselves (measured: benchmarks/notes/quality-ml-100k.md). Without factors it adds zero,
  so the base model scores exactly as before;
- unit groups that can be slimmed: `head` (m units) and `block{i}.ffn` (f units per block); a
  per-sample 0/1 mask over a group's units switches them off, and `slimmed()` builds the
  physically smaller model that a hard mask implies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot -> (A (B, d_in, r), B (B, r, d_out))
Masks = dict[str, torch.Tensor]  # unit group -> (B, n_units) in {0, 1}


@dataclass
class DeviceModelConfig:
    n_items: int
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    ffn_units: int = 64
    head_units: int = 128
    max_len: int = 50
    dropout: float = 0.5
    # Initialisation: "scaled" (items N(0, 1/d), positions N(0, 0.02^2)), "xavier" (xavier-normal
    # item and position embeddings: they start at comparable, small scales), or "reference"
    # (xavier-normal for every weight matrix, embeddings included, as the public SASRec PyTorch
    # reference initialises; vectors - biases, layer norms - keep their defaults).
    init: str = "scaled"
    block: str = "pre-ln"  # Block.STYLES
    # "masked": queries see only real items; "visible": they also see the left padding of the
    # max_len window, as the public SASRec reference does (sequence_inputs, PADDING_ATTENTION).
    padding_attention: str = "masked"
    # Width of the cloud item table the device carries for the `head.cloud` slot (0: no table, no slot).
    cloud_items: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterLinear(nn.Module):
    """y = x @ (W0 + A B) + b, with W0 stored (d_in, d_out) so the slot and its factors share a layout."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.kaiming_uniform_(self.weight.T, a=math.sqrt(5))  # nn.Linear's default, on (out, in)

    def forward(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        y = x @ self.weight + self.bias  # (B, L, d_out)
        if factors is not None:
            a, b = factors  # (B, d_in, r), (B, r, d_out)
            y = y + (x @ a) @ b  # low-rank path never forms the (d_in, d_out) delta
        return y


class BlockConfig(Protocol):
    """What a block reads from a model config (the device and the cloud model share the block)."""

    hidden: int
    n_heads: int
    ffn_units: int
    dropout: float
    block: str


class Block(nn.Module):
    """Causal self-attention + point-wise feed-forward, in one of two arrangements (`cfg.block`):

    - "pre-ln": x + Attn(LN(x)), then x + FFN(LN(x)) with GELU: the residual stream is never
      normalised inside the stack (the usual pre-LN transformer);
    - "sasrec": the original SASRec's (Kang & McAuley's code, and the public PyTorch port): queries
      from LN(x), keys and values from x itself, the residual added to the normalised queries,
      then LN before a ReLU feed-forward with its own residual, dropout after both of its layers.
      The stream is re-normalised in every block.

    Both keep the same parameters under the same names, so slimming, export and the adapter slots
    do not depend on the arrangement.
    """

    STYLES = ("pre-ln", "sasrec")

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        assert cfg.hidden % cfg.n_heads == 0
        if cfg.block not in self.STYLES:
            raise ValueError(f"unknown block {cfg.block!r}; known: {', '.join(self.STYLES)}")
        self.sasrec = cfg.block == "sasrec"
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ffn_in = nn.Linear(cfg.hidden, cfg.ffn_units)
        self.ffn_out = nn.Linear(cfg.ffn_units, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, unit_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, d = x.shape
        h = self.n_heads
        normed = self.ln1(x)
        if self.sasrec:  # queries from the normalised stream, keys and values from the stream itself
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(normed, w[:d], b[:d])
            k, v = F.linear(x, w[d:], b[d:]).split(d, dim=-1)
        else:
            q, k, v = self.qkv(normed).split(d, dim=-1)  # 3 x (B, L, d)
        if attn_bias.shape[-1] == L + 1:  # visible padding: its one shared key and value lead the keys
            pad_k, pad_v = self._padding_key_value()
            k, v = torch.cat([pad_k.expand(B, 1, d), k], dim=1), torch.cat([pad_v.expand(B, 1, d), v], dim=1)
        q = q.reshape(B, L, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        k, v = (t.reshape(B, t.shape[1], h, d // h).transpose(1, 2) for t in (k, v))  # (B, h, L', d/h)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h) + attn_bias  # (B, h, L, L')
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, L, d)  # (B, L, d)
        if self.sasrec:
            x = self.ln2(normed + self.proj(y))
            u = F.relu(self.drop(self.ffn_in(x)))  # (B, L, f)
        else:
            x = x + self.drop(self.proj(y))
            u = F.gelu(self.ffn_in(self.ln2(x)))  # (B, L, f)
        if unit_mask is not None:
            u = u * unit_mask[:, None, :]  # switch off dropped feed-forward units
        return x + self.drop(self.ffn_out(u))

    def _padding_key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 1, d) key and value of a padding position: its state is zero (every block's output is
        zeroed there), so both are what the projections make of zero, computed as for any key."""
        d = self.proj.weight.shape[0]
        zero = self.qkv.weight.new_zeros(1, 1, d)
        if self.sasrec:
            k, v = F.linear(zero, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=-1)
        else:
            _, k, v = self.qkv(self.ln1(zero)).split(d, dim=-1)
        return k, v


class DeviceModel(nn.Module):
    def __init__(self, cfg: DeviceModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        # The user-side head: a residual bottleneck whose two linear layers are the adapter slots.
        self.head_up = AdapterLinear(d, cfg.head_units)
        self.head_down = AdapterLinear(cfg.head_units, d)
        if cfg.init == "xavier":
            nn.init.xavier_normal_(self.item_emb.weight)
            nn.init.xavier_normal_(self.pos_emb.weight)
        elif cfg.init == "scaled":
            nn.init.normal_(self.item_emb.weight, std=d**-0.5)
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        elif cfg.init == "reference":
            for param in self.parameters():
                if param.dim() == 2:
                    nn.init.xavier_normal_(param)
        else:
            raise ValueError(f"unknown init {cfg.init!r}; known: scaled, xavier, reference")
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        # The cloud model's item vectors (frozen: a buffer, part of the base weights and the package).
        self.register_buffer("cloud_item_table", torch.zeros(cfg.n_items + 1, cfg.cloud_items)
                             if cfg.cloud_items else None)

    @torch.no_grad()
    def carry_cloud_items(self, table: torch.Tensor) -> None:
        """Carry the cloud model's (n_items + 1, k) item table, adding the `head.cloud` slot. The
        static scores do not change (the slot adds zero without factors); the base version does,
        since the table is part of what a device downloads."""
        if table.shape[0] != self.cfg.n_items + 1:
            raise ValueError(f"cloud item table has {table.shape[0]} rows, the model {self.cfg.n_items + 1}")
        self.cfg = replace(self.cfg, cloud_items=int(table.shape[1]))
        self.cloud_item_table = table.detach().clone().to(self.item_emb.weight)
        self.cloud_item_table[0].zero_()

    @property
    def user_dim(self) -> int:
        """Width of the vectors `user_states` returns and `output_table` holds: d, plus k with the
        cloud table (the device's state, then its map into the cloud's item space)."""
        return self.cfg.hidden + self.cfg.cloud_items

    # -- what the generator and the exporter need to know -------------------------------------
    def slot_shapes(self) -> dict[str, tuple[int, int]]:
        (d, m), (m2, d2) = self.head_up.weight.shape, self.head_down.weight.shape
        shapes = {"head.up": (d, m), "head.down": (m2, d2)}
        if self.cfg.cloud_items:
            shapes["head.cloud"] = (d2 + 1, self.cfg.cloud_items)
        return shapes

    def unit_groups(self) -> dict[str, int]:
        groups = {"head": self.cfg.head_units}
        groups.update({f"block{i}.ffn": self.cfg.ffn_units for i in range(self.cfg.n_blocks)})
        return groups

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, seq: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        """(B, L) item ids, left-padded with 0 -> (B, L, d) backbone states (zero at padding)."""
        x, keep, attn_bias = sequence_inputs(seq, self.item_emb(seq), self.pos_emb, self.emb_drop, self.cfg.max_len,
                                             self.cfg.padding_attention)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_bias, None if masks is None else masks.get(f"block{i}.ffn")) * keep
        return self.ln_f(x)  # (B, L, d)

    def head(self, x: torch.Tensor, adapters: Adapters | None = None, masks: Masks | None = None) -> torch.Tensor:
        """(B, L, d) backbone states -> (B, L, user_dim) user states, with optional per-sample deltas
        and masks: the head's output, then (with the cloud table) its map into the cloud's item space."""
        adapters = adapters or {}
        u = F.gelu(self.head_up(x, adapters.get("head.up")))  # (B, L, m)
        if masks is not None and "head" in masks:
            u = u * masks["head"][:, None, :]
        user = x + self.head_down(u, adapters.get("head.down"))  # (B, L, d)
        if not self.cfg.cloud_items:
            return user
        factors = adapters.get("head.cloud")
        if factors is None:
            cross = user.new_zeros(*user.shape[:-1], self.cfg.cloud_items)
        else:
            a, b = factors  # (B, d + 1, r), (B, r, k): the constant's row of A is a fixed offset
            cross = (user @ a[:, :-1] + a[:, -1:]) @ b  # (B, L, k)
        return torch.cat([user, cross], dim=-1)

    def user_states(self, seq: torch.Tensor, adapters: Adapters | None = None, masks: Masks | None = None):
        return self.head(self.encode(seq, masks), adapters, masks)  # (B, L, user_dim)

    def base_state(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) windows -> (B, d) the base model's user state after each: what the generator reads
        as the device's own state (the cloud part of a base state is zero, so it is left out)."""
        return self.user_states(seq)[:, -1, : self.cfg.hidden]

    def output_table(self) -> torch.Tensor:
        """(n_items + 1, user_dim) the vectors user states are scored against: the tied item table,
        then the cloud item table when the model carries one."""
        if not self.cfg.cloud_items:
            return self.item_emb.weight
        return torch.cat([self.item_emb.weight, self.cloud_item_table], dim=-1)

    def score(
        self, seq: torch.Tensor, candidates: torch.Tensor, adapters: Adapters | None = None,
        masks: Masks | None = None,
    ) -> torch.Tensor:
        """(B, L) history, (B, C) candidate ids -> (B, C) scores of the next item."""
        return self.score_behaviour(self.encode(seq, masks)[:, -1, :], candidates, adapters, masks)[0]

    def score_behaviour(self, behaviour: torch.Tensor, candidates: torch.Tensor, adapters: Adapters | None = None,
                        masks: Masks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) backbone states, (B, C) candidate ids -> (B, C) scores and the (B, d) user states
        they come from: the head (position-wise) on the last position alone, then each candidate's
        vectors gathered from the item table and the cloud item table (never the whole catalogue)."""
        user = self.head(behaviour[:, None, :], adapters, masks)[:, 0, :]  # (B, user_dim)
        d = self.cfg.hidden
        scores = (self.item_emb(candidates) * user[:, None, :d]).sum(-1)  # (B, C)
        if self.cfg.cloud_items:
            scores = scores + (self.cloud_item_table[candidates] * user[:, None, d:]).sum(-1)
        return scores, user[:, :d]

    # -- slimming --------------------------------------------------------------------------------
    @torch.no_grad()
    def slimmed(self, keep: dict[str, torch.Tensor]) -> DeviceModel:
        """The physically smaller model a hard mask implies: dropped units' weights are sliced away.

        `keep` maps a unit group to a bool (n_units,) vector (one device, not a batch). Groups left
        out keep all units. The result computes exactly what the masked model computes.
        """
        cfg = DeviceModelConfig(**self.cfg.to_dict())
        idx = {g: torch.nonzero(keep[g]).flatten() if g in keep else torch.arange(n)
               for g, n in self.unit_groups().items()}
        ffn_sizes = {len(idx[f"block{i}.ffn"]) for i in range(cfg.n_blocks)}
        # Blocks may keep different unit counts; the config records the largest, the weights the truth.
        cfg.ffn_units = max(ffn_sizes) if ffn_sizes else cfg.ffn_units
        cfg.head_units = len(idx["head"])
        small = DeviceModel(cfg)
        sd = {k: v.clone() for k, v in self.state_dict().items()}
        for i in range(cfg.n_blocks):
            j = idx[f"block{i}.ffn"]
            sd[f"blocks.{i}.ffn_in.weight"] = sd[f"blocks.{i}.ffn_in.weight"][j]  # (f', d)
            sd[f"blocks.{i}.ffn_in.bias"] = sd[f"blocks.{i}.ffn_in.bias"][j]
            sd[f"blocks.{i}.ffn_out.weight"] = sd[f"blocks.{i}.ffn_out.weight"][:, j]  # (d, f')
            small.blocks[i].ffn_in = nn.Linear(cfg.hidden, len(j))
            small.blocks[i].ffn_out = nn.Linear(len(j), cfg.hidden)
        h = idx["head"]
        sd["head_up.weight"] = sd["head_up.weight"][:, h]  # (d, m')
        sd["head_up.bias"] = sd["head_up.bias"][h]
        sd["head_down.weight"] = sd["head_down.weight"][h]  # (m', d)
        small.load_state_dict(sd)
        return small.eval()

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_user(self, n_candidates: int = 101) -> int:
        """Multiply-adds x2 to score one full-length history against `n_candidates` items.

        Counts the weight matrices actually present, so a slimmed model reports its own cost."""
        L, d = self.cfg.max_len, self.cfg.hidden
        flops = 0
        for block in self.blocks:
            assert isinstance(block, Block)
            f = int(block.ffn_in.weight.shape[0])  # Linear(d, f).weight is (f, d)
            flops += 2 * L * (3 * d * d + d * d + 2 * d * f) + 2 * 2 * L * L * d  # projections, ffn, attention
        m = self.head_up.weight.shape[1]
        flops += 2 * 2 * d * m  # head, last position only
        k = self.cfg.cloud_items
        return int(flops + 2 * n_candidates * (d + k))


PADDING_ATTENTION = ("masked", "visible")


def sequence_inputs(seq: torch.Tensor, items: torch.Tensor, pos_emb: nn.Embedding, drop: nn.Dropout,
                    max_len: int, padding: str = "masked") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every encoder feeds its blocks: (B, L) ids, left-padded with 0, and their (B, L, d) item
    vectors -> scaled item + position embeddings (B, L, d), the non-padding mask (B, L, 1), and the
    additive causal attention bias (B, 1, L, L).

    `padding="visible"` lets queries also attend to the padding, as the public SASRec reference
    does (it masks only the future): every padding position holds the zero state, so they share one
    key and value, and n of them weigh what one key with log(n) added to its score weighs. The bias
    then has a leading column, log(n) for n = max_len - real items (the padding of the reference's
    max_len-wide window, whatever width a trimmed batch has), and Block puts that key first. A
    window without padding gets -1e9 there."""
    B, L = seq.shape
    assert L <= max_len, f"sequence length {L} > max_len {max_len}"
    if padding not in PADDING_ATTENTION:
        raise ValueError(f"unknown padding attention {padding!r}; known: {', '.join(PADDING_ATTENTION)}")
    keep = (seq > 0).unsqueeze(-1).to(items.dtype)  # (B, L, 1)
    pos = torch.arange(max_len - L, max_len, device=seq.device)  # right-aligned
    x = drop(items * math.sqrt(items.shape[-1]) + pos_emb(pos)) * keep  # (B, L, d)
    # Additive bias: a query sees itself and earlier non-padding keys. A large finite negative
    # (not -inf) keeps fully padded rows finite; they are zeroed by `keep` after every block.
    causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # (L, L)
    visible = causal[None, :, :] & (seq > 0)[:, None, :]  # (B, L, L)
    attn_bias = torch.where(visible, 0.0, -1e9).to(x.dtype).unsqueeze(1)  # (B, 1, L, L)
    if padding == "visible":
        n_pad = (max_len - (seq > 0).sum(dim=1)).to(x.dtype)  # (B,)
        weight = torch.where(n_pad > 0, torch.log(n_pad.clamp(min=1.0)), torch.full_like(n_pad, -1e9))
        attn_bias = torch.cat([weight[:, None, None, None].expand(B, 1, L, 1), attn_bias], dim=-1)  # (B, 1, L, 1+L)
    return x, keep, attn_bias


def slice_adapters(adapters: Adapters, keep: dict[str, torch.Tensor]) -> Adapters:
    """Slice generated factors to a slimmed head: B of head.up loses dropped columns, A of head.down rows."""
    if "head" not in keep:
        return adapters
    h = torch.nonzero(keep["head"]).flatten()
    out = dict(adapters)
    if "head.up" in out:
        a, b = out["head.up"]
        out["head.up"] = (a, b[..., h])
    if "head.down" in out:
        a, b = out["head.down"]
        out["head.down"] = (a[..., h, :], b)
    return out


def left_pad(sequences: list, max_len: int, trim: bool = False) -> torch.Tensor:
    """Keep each sequence's last `max_len` items, left-pad with 0 -> (B, max_len) int64.

    With `trim`, the width is the longest kept sequence instead: positions are right-aligned, so a
    shorter batch computes the same states without attending over columns of padding."""
    if trim:
        max_len = max(1, min(max_len, max((len(s) for s in sequences), default=1)))
    out = torch.zeros(len(sequences), max_len, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail):] = torch.as_tensor(tail, dtype=torch.long)
    return out

"""The cloud model: the strongest sequential recommender the cloud can afford, and the teacher the
generator distils into per-device deltas.

What it has that a device model does not: the whole history (`max_len` 200 by default against a
device's short window), more width and depth, and the items' side features. Its scores are the
`cloud` variant of `paramcast evaluate`: what serving every interaction from the cloud would give.

Item side features come from the loaders' `InteractionLog.item_features` in any of their three
shapes, turned into one padded id table per feature:
- multi-hot flags (n_items + 1, G) uint8, e.g. ml-100k genres -> the ids of the set flags;
- id lists (n_items + 1, A) int64, e.g. amazon-beauty attributes -> as they are;
- one id per item (n_items + 1,) int64, e.g. grocery categories -> one column.
On the input side an item is its own embedding plus the mean embedding of its feature ids, per
feature, so the encoder reads a rarely seen item through the items that share its brand or genre.
Scores stay dot products with the items' own embeddings: measured on ml-100k, scoring against the
feature-mixed vectors too let the shared genre part dominate every logit and held validation
NDCG@10 at the popularity level (0.26 against 0.41 for the device model).

User side features (`InteractionLog.user_features`, e.g. ml-100k's age group, gender, occupation
and zip region), when the model is built to read them (`paramcast train --user-features`), enter
as a profile: one code per feature and user, whose summed embeddings are added to every input
position, so attention reads the history in the light of who is reading it. Off by default: on
ml-100k validation it did not beat the model without them (benchmarks/notes/quality-ml-100k.md), and a
request carries a device's history, not its owner's profile, so the generator and the variants
built on it take no profile (cloud/evaluate.py refuses them for such a model).

Shapes: B = batch, L = sequence length (left-padded with 0), d = hidden, C = candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from paramcast.cloud.model import Block, sequence_inputs


@dataclass
class CloudModelConfig:
    n_items: int
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    ffn_units: int = 128
    max_len: int = 200
    dropout: float = 0.2
    block: str = "pre-ln"  # model.Block.STYLES
    # feature name -> [ids per item (table width), vocabulary size]; filled from the data
    features: dict[str, list[int]] = field(default_factory=dict)
    # user feature name -> vocabulary size, in the order of a profile's columns; filled from the data
    user_features: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def feature_tables(item_features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every side feature as an (n_items + 1, A) int64 table of ids in 1..K, 0 = none."""
    tables = {}
    for name, values in sorted(item_features.items()):
        values = np.asarray(values)
        if values.ndim == 1:
            table = values[:, None].astype(np.int64)  # one id per item
        elif values.dtype == np.uint8 or values.dtype == bool:
            flags = values.astype(bool)  # multi-hot -> ids of the set flags, left-aligned
            width = max(1, int(flags.sum(1).max()))
            table = np.zeros((len(values), width), dtype=np.int64)
            for row in np.nonzero(flags.any(1))[0]:
                ids = np.nonzero(flags[row])[0] + 1
                table[row, : len(ids)] = ids
        else:
            table = values.astype(np.int64)
        if table.shape[1] and table.max() > 0:
            tables[name] = table
    return tables


class CloudModel(nn.Module):
    def __init__(self, cfg: CloudModelConfig, tables: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        self.feature_emb = nn.ModuleDict()
        for name, (width, vocab) in cfg.features.items():
            table = torch.zeros(cfg.n_items + 1, width, dtype=torch.long)
            if tables is not None:
                table = torch.as_tensor(tables[name], dtype=torch.long)
                assert table.shape == (cfg.n_items + 1, width), (name, table.shape)
            self.register_buffer(f"feature_ids_{name}", table)  # travels with the state dict
            emb = nn.Embedding(vocab + 1, d, padding_idx=0)
            nn.init.normal_(emb.weight, std=d**-0.5)
            self.feature_emb[name] = emb
        self.user_emb = nn.ModuleDict()
        for name, vocab in cfg.user_features.items():
            emb = nn.Embedding(vocab + 1, d, padding_idx=0)  # 0: a user the side file does not list
            nn.init.normal_(emb.weight, std=d**-0.5)
            self.user_emb[name] = emb
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            for table_emb in (*self.feature_emb.values(), *self.user_emb.values()):
                assert isinstance(table_emb, nn.Embedding)
                table_emb.weight[0].zero_()

    @classmethod
    def for_data(cls, cfg: CloudModelConfig, item_features: dict[str, np.ndarray],
                 user_features: dict[str, np.ndarray] | None = None) -> CloudModel:
        """A model whose config records the data's side features (`cfg.features` and
        `cfg.user_features` are filled in; no user features unless they are given)."""
        tables = feature_tables(item_features)
        cfg.features = {name: [int(t.shape[1]), int(t.max())] for name, t in tables.items()}
        cfg.user_features = {name: int(v.max()) for name, v in sorted((user_features or {}).items()) if v.max() > 0}
        return cls(cfg, tables)

    def profiles(self, user_features: dict[str, np.ndarray], users: np.ndarray) -> torch.Tensor | None:
        """(U, F) the profile columns this model reads, for `users` (indices into the log's users);
        None when it reads none. Codes past the vocabulary the model was trained on read as unknown."""
        if not self.cfg.user_features:
            return None
        missing = [name for name in self.cfg.user_features if name not in user_features]
        if missing:
            raise ValueError(f"the cloud model reads user features {missing} that this data does not have")
        cols = [np.where(user_features[name][users] <= vocab, user_features[name][users], 0)
                for name, vocab in self.cfg.user_features.items()]
        return torch.as_tensor(np.stack(cols, axis=1), dtype=torch.long)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (..., d) input vectors: own embedding + mean feature embeddings."""
        x = self.item_emb(items)
        for name, emb in self.feature_emb.items():
            ids = getattr(self, f"feature_ids_{name}")[items]  # (..., A)
            has = (ids > 0).to(x.dtype)
            x = x + (emb(ids) * has.unsqueeze(-1)).sum(-2) / has.sum(-1, keepdim=True).clamp(min=1.0)
        return x

    def encode(self, seq: torch.Tensor, profile: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) item ids, left-padded with 0, and for a model that reads user features their (B, F)
        profile codes -> (B, L, d) user states (zero at padding)."""
        items = self.item_vectors(seq)
        if self.cfg.user_features:
            if profile is None or profile.shape != (len(seq), len(self.user_emb)):
                raise ValueError(f"this cloud model reads the user features {list(self.cfg.user_features)}: "
                                 f"pass a ({len(seq)}, {len(self.user_emb)}) profile, got "
                                 f"{None if profile is None else tuple(profile.shape)}")
            user = sum(emb(profile[:, j]) for j, emb in enumerate(self.user_emb.values()))  # (B, d)
            items = items + user[:, None, :]
        x, keep, attn_bias = sequence_inputs(seq, items, self.pos_emb, self.emb_drop, self.cfg.max_len)
        for block in self.blocks:
            x = block(x, attn_bias, None) * keep
        return self.ln_f(x)  # (B, L, d)

    # The trainer and the evaluation treat both models alike through these two names.
    def user_states(self, seq: torch.Tensor, adapters=None, masks=None, profile=None) -> torch.Tensor:
        assert adapters is None and masks is None, "the cloud model takes no deltas"
        return self.encode(seq, profile)

    def output_table(self) -> torch.Tensor:
        """(n_items + 1, d) the vectors user states are scored against (the tied item table)."""
        return self.item_emb.weight

    def score(self, seq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, L) history, (B, C) candidate ids -> (B, C) scores of the next item."""
        user = self.encode(seq)[:, -1, :]  # (B, d)
        return (self.item_emb(candidates) * user[:, None, :]).sum(-1)  # (B, C)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_request(self, n_candidates: int = 101, history: int | None = None) -> int:
        """Multiply-adds x2 to score one history of `history` items (default max_len) against
        `n_candidates` items: what serving one interaction from the cloud costs."""
        L, d, f = history or self.cfg.max_len, self.cfg.hidden, self.cfg.ffn_units
        per_block = 2 * L * (3 * d * d + d * d + 2 * d * f) + 2 * 2 * L * L * d
        return int(self.cfg.n_blocks * per_block + 2 * n_candidates * d)

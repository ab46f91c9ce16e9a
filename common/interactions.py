"""The one in-memory form every loader produces, and the leave-one-out split on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class InteractionLog:
    """Per-user item sequences in time order, with contiguous item ids.

    Item ids run 1..n_items; 0 is reserved for padding. `item_raw_ids[i]` is the id the source
    file used for internal item i (index 0 is the padding entry ""). Users are in ascending
    raw-id order; `user_raw_ids[u]` is the source id of user u.
    """

    name: str
    sequences: list[np.ndarray]  # per user: int64 item ids, time order
    n_items: int
    user_raw_ids: list[str]
    item_raw_ids: list[str]
    timestamps: list[np.ndarray] | None = None  # per user: int64 unix seconds, aligned with sequences
    item_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_items + 1, ...) rows
    user_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_users,) codes, 0 = unknown
    source: str = ""  # path or paths it was read from

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=self.n_users)

    def summary(self) -> dict:
        lengths = self.lengths()
        return {
            "name": self.name,
            "source": self.source,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "has_timestamps": self.timestamps is not None,
            "item_features": sorted(self.item_features),
            "user_features": sorted(self.user_features),
            "sequence_length": {
                "min": int(lengths.min()) if len(lengths) else 0,
                "mean": float(lengths.mean()) if len(lengths) else 0.0,
                "median": float(np.median(lengths)) if len(lengths) else 0.0,
                "p90": float(np.percentile(lengths, 90)) if len(lengths) else 0.0,
                "max": int(lengths.max()) if len(lengths) else 0,
            },
            "density": self.n_interactions / max(1, self.n_users * self.n_items),
        }

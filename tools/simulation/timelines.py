"""Device timelines: one device per real user, its interactions replayed in time order.

A device enrols after a warm-up prefix of `warmup` interactions; every later interaction is one
step. At step j of a device whose user's items are `seq`, the history is seq[:t] with
t = warmup + j and the target is seq[t], ranked among `n_negatives` items the user never
interacted with (drawn per step, with a fixed seed, so every policy sees the same candidates).

Steps of all devices live in flat arrays (N = total steps). Devices are ordered by their number of
steps, longest first, so at step j the devices still replaying are a prefix `[0, active(j))` and
a device's steps are the contiguous block `start[i] : start[i] + length[i]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.common.interactions import InteractionLog


@dataclass
class Timelines:
    data: InteractionLog
    users: np.ndarray  # (D,) user index of each device, longest timeline first
    warmup: int
    start: np.ndarray  # (D,) first flat step of each device
    length: np.ndarray  # (D,) steps of each device
    t: np.ndarray  # (N,) position of each step's target in its user's sequence
    device: np.ndarray  # (N,) device row of each step
    candidates: np.ndarray  # (N, 1 + n_negatives) item ids, the target in column 0

    @property
    def n_devices(self) -> int:
        return len(self.users)

    @property
    def n_steps(self) -> int:
        return len(self.t)

    @property
    def max_length(self) -> int:
        return int(self.length.max()) if len(self.length) else 0

    def active(self, j: int) -> int:
        """Number of devices that replay step j (a prefix of the device rows)."""
        return int(np.searchsorted(-self.length, -j, side="left"))

    def step_index(self) -> np.ndarray:
        """(N,) step number j of every flat step within its device's timeline."""
        return np.arange(self.n_steps) - self.start[self.device]

    def history(self, k: int) -> np.ndarray:
        """The item ids a device had seen before step k's target."""
        return self.data.sequences[int(self.users[self.device[k]])][: int(self.t[k])]

    def per_device_mean(self, values: np.ndarray) -> np.ndarray:
        """(N,) per-step values -> (D,) mean over each device's steps."""
        return np.add.reduceat(values.astype(np.float64), self.start) / self.length

    def subset(self, rows: np.ndarray) -> Timelines:
        """The timelines of some device rows (kept in the given order, which must stay longest-first)."""
        rows = np.asarray(rows, dtype=np.int64)
        assert np.all(np.diff(self.length[rows]) <= 0), "device rows must stay ordered longest first"
        steps = np.concatenate([np.arange(self.start[r], self.start[r] + self.length[r]) for r in rows]) \
            if len(rows) else np.empty(0, np.int64)
        length = self.length[rows]
        start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(rows) else length
        return Timelines(self.data, self.users[rows], self.warmup, start, length, self.t[steps],
                         np.repeat(np.arange(len(rows)), length), self.candidates[steps])


def build_timelines(data: InteractionLog, users: np.ndarray, warmup: int = 3, n_negatives: int = 100,
                    max_steps: int | None = None, seed: int = 0) -> Timelines:
    """Timelines of `users` (those with at least warmup + 1 interactions; others are dropped).

    `max_steps` caps each device's replay at its first max_steps steps.
    """
    if warmup < 1:
        raise InvalidInput("warmup", f"must be >= 1 (a bundle needs a window), got {warmup}")
    users = np.asarray(users, dtype=np.int64)
    lengths = data.lengths()[users] - warmup
    if max_steps is not None:
        lengths = np.minimum(lengths, max_steps)
    keep = lengths > 0
    users, lengths = users[keep], lengths[keep]
    order = np.argsort(-lengths, kind="stable")  # longest first; ties keep user order
    users, lengths = users[order], lengths[order]
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(users) else lengths
    t = np.concatenate([warmup + np.arange(n) for n in lengths]).astype(np.int64) if len(users) \
        else np.empty(0, np.int64)
    device = np.repeat(np.arange(len(users)), lengths)
    rng = np.random.default_rng(seed)
    candidates = np.empty((len(t), 1 + n_negatives), dtype=np.int64)
    seen = np.zeros(data.n_items + 1, dtype=bool)
    for row, user in enumerate(users):
        seq = data.sequences[int(user)]
        seen[seq] = True
        seen[0] = True  # padding is never a candidate
        if data.n_items - (seen.sum() - 1) < n_negatives:
            raise InvalidInput("n_negatives", f"user {data.user_raw_ids[user]} has fewer than {n_negatives} "
                                              "unseen items")
        block = slice(start[row], start[row] + lengths[row])
        candidates[block, 0] = seq[t[block]]
        candidates[block, 1:] = _unseen(rng, seen, int(lengths[row]), n_negatives, data.n_items)
        seen[seq] = False
    return Timelines(data, users, warmup, start, lengths, t, device, candidates)


def _unseen(rng: np.random.Generator, seen: np.ndarray, rows: int, n: int, n_items: int) -> np.ndarray:
    """(rows, n) items drawn uniformly without replacement (within a row) from those not `seen`.

    Draws 2n ids per row at once and keeps, in draw order, the first n that are unseen and not a
    repeat within the row; the rare row with too few is drawn again.
    """
    out = np.empty((rows, n), dtype=np.int64)
    todo = np.arange(rows)
    while len(todo):
        draw = rng.integers(1, n_items + 1, size=(len(todo), 2 * n))  # (R, 2n)
        ok = ~seen[draw]
        # A repeat within a row: after a stable sort, equal neighbours mark all but the first draw.
        order = np.argsort(draw, axis=1, kind="stable")
        sorted_draw = np.take_along_axis(draw, order, axis=1)
        repeat_sorted = np.zeros_like(ok)
        repeat_sorted[:, 1:] = sorted_draw[:, 1:] == sorted_draw[:, :-1]
        repeat = np.zeros_like(ok)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        ok &= ~repeat
        rank = np.cumsum(ok, axis=1)
        full = rank[:, -1] >= n
        take = ok & (rank <= n)
        out[todo[full]] = draw[full][take[full]].reshape(-1, n)
        todo = todo[~full]
    return out


def split_devices(data: InteractionLog, cold_users: list[str], pool: str, valid_fraction: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(validation users, test users) drawn from a pool of users.

    pool "cold": the users the checkpoint held out of training (new devices; the honest setting);
    "all": every user (their earlier interactions were training data, so quality is in-sample).
    The pool is split at random (fixed seed) into validation devices - the only ones thresholds
    are calibrated and mappers fitted on - and test devices.
    """
    if pool == "cold":
        raw = set(cold_users)
        users = np.array([u for u, r in enumerate(data.user_raw_ids) if r in raw], dtype=np.int64)
        if len(users) == 0:
            raise InvalidInput("devices", "the checkpoint records no held-out (cold) users for this data; "
                                          "use --devices all")
    elif pool == "all":
        users = np.arange(data.n_users, dtype=np.int64)
    else:
        raise InvalidInput("devices", f"must be 'cold' or 'all', got {pool!r}")
    if not 0.0 < valid_fraction < 1.0:
        raise InvalidInput("valid_fraction", f"must be in (0, 1), got {valid_fraction}")
    rng = np.random.default_rng(seed + 104729)
    shuffled = rng.permutation(users)
    n_valid = int(round(valid_fraction * len(users)))
    return np.sort(shuffled[:n_valid]), np.sort(shuffled[n_valid:])

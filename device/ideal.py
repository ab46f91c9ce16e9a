"""The IDEAL-style gate (Lv et al., WWW 2024): request when a fresh bundle would move the ranking.

A distribution mapper turns what the device knows - its behaviour embedding now and when the held
bundle was generated - into a Gaussian over the change a fresh bundle would make to the user
state; the gate's score is how far that change would move the items' scores relative to one
another, in expectation under the Gaussian, computed in closed form. Numpy only, like every gate;
the mapper's weights are fitted offline on validation devices
(`paramcast.simulation.calibration.fit_gaussian_mapper`) and shipped to devices as a small .npz file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.device.policy import Gate, StepView

_EPS = 1e-6  # keeps log |change|^2 finite right after a bundle (change = 0)
_LOG_EPS = math.log(_EPS)
_TABLE_STEP, _TABLE_SIZE = 1.0 / 256, 48 * 256 + 1  # the variance table: log |b - ref|^2 up to 1e15


def mapper_features(behaviour: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the distribution mapper reads: mean features x (n, 2d + 1) and variance features z (n, 2).

    Mean: the behaviour change since the held bundle, the behaviour itself, a constant. Variance:
    the log squared size of that change, a constant.
    """
    diff = behaviour - ref  # (n, d)
    ones = np.ones((len(behaviour), 1), dtype=np.float32)
    x = np.concatenate([diff, behaviour, ones], axis=1)  # (n, 2d + 1)
    z = np.stack([np.log((diff * diff).sum(1) + _EPS), np.ones(len(behaviour))], axis=1)  # (n, 2)
    return x.astype(np.float32), z.astype(np.float32)


@dataclass
class GaussianMapper:
    """Behaviour -> N(mean, diag(exp(log_var))) over the change a fresh bundle makes to the user state.

    mean = x @ w_mean, log_var = z @ w_log_var with x, z from `mapper_features`.
    """

    w_mean: np.ndarray  # (2d + 1, d)
    w_log_var: np.ndarray  # (2, d)
    meta: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.w_mean.shape[1]

    def __call__(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x @ self.w_mean, z @ self.w_log_var  # (n, d) each

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, w_mean=self.w_mean, w_log_var=self.w_log_var)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GaussianMapper:
        with np.load(path) as f:
            return cls(f["w_mean"].astype(np.float32), f["w_log_var"].astype(np.float32))


class IdealGate(Gate):
    """Expected spread of the score change a fresh bundle would make, over the item catalogue.

    The mapper turns (behaviour now, behaviour at the held bundle) into a Gaussian N(mean,
    diag(var)) over the change a fresh bundle would make to the user state; the change moves item
    i's score by e_i . change (e_i its embedding, what scores dot with). The score is the root of
    the expected variance of those moves across the catalogue,

        sqrt(E[Var_i(e_i . change)]) = sqrt(mean' S mean + sum_k S_kk var_k),   S = Cov_i(e_i),

    in score units. A move shared by every item leaves the ranking as it is, hence the variance;
    the expectation is exact, so no draws are taken (a sampled estimate over the candidates needs
    some twenty numpy calls per step, several times what this gate may cost a device).

    For speed everything per step is one product: with x = [b - ref, b, 1],
    mean = b @ (W_diff + W_b) - (ref @ W_diff - w_1), the bracket fixed while a bundle is held;
    with S = L L', mean' S mean = |mean @ L|^2; so [mean @ L, b - ref] = b @ [(W_diff + W_b) L, I]
    - [(ref @ W_diff - w_1) L, ref], and the variance term is sum_k S_kk exp(w_lv1_k)
    (|b - ref|^2 + eps) ** w_lv0_k (the mapper's log-variance, z = [log(|b - ref|^2 + eps), 1]).
    """

    name = "ideal"

    def __init__(self, mapper: GaussianMapper, item_emb: np.ndarray, threshold: float | None = None,
                 rate: float | None = None, min_interval: int = 1, pace: float = 0.0, burst: float = 1.0):
        super().__init__(threshold, rate, min_interval, pace, burst)
        d = item_emb.shape[1]
        if mapper.w_mean.shape != (2 * d + 1, d) or mapper.w_log_var.shape != (2, d):
            raise InvalidInput("mapper", f"expects hidden size {mapper.hidden}, items have {d}")
        if len(item_emb) < 3:
            raise InvalidInput("item_emb", f"needs at least two items besides padding, got {len(item_emb) - 1}")
        self.mapper = mapper
        # (d, d) S over the catalogue; row 0 of the table is padding, never scored
        cov = np.cov(np.asarray(item_emb, dtype=np.float64)[1:], rowvar=False)
        lam, vec = np.linalg.eigh(cov)
        root = vec * np.sqrt(np.maximum(lam, 0.0))  # L: S = L L'
        w = mapper.w_mean.astype(np.float64)
        self.w_diff, self.w_const = w[:d], w[2 * d]  # (d, d), (d,)
        self.w_cat = np.concatenate([(w[:d] + w[d:2 * d]) @ root, np.eye(d)], axis=1).astype(np.float32)  # (d, 2d)
        self.root = root
        self.sel = np.zeros((2 * d, 2), np.float32)  # sums the squares of each half of [mean @ L, b - ref]
        self.sel[:d, 0] = self.sel[d:, 1] = 1.0
        self.var_weight = np.diag(cov) * np.exp(mapper.w_log_var[1].astype(np.float64))  # (d,) S_kk exp(w_lv1)
        self.var_power = mapper.w_log_var[0].astype(np.float64)  # (d,)
        # score_one reads the variance term from a table of its log over l = log(|b - ref|^2 + eps),
        # linearly interpolated: one Python lookup instead of two numpy calls. log(sum_k w_k e^(p_k l))
        # has a second derivative of at most (max p - min p)^2 / 4, so at this step the relative
        # error is below 1e-6 while the powers span less than 1.4 (fitted mappers: under 1), below
        # 5e-5 for a span of 10; beyond the table, the exact sum.
        grid = _LOG_EPS + np.arange(_TABLE_SIZE) * _TABLE_STEP
        self._log_spread = np.log(np.exp(np.outer(grid, self.var_power)) @ self.var_weight + 1e-300).tolist()
        self.ref_cat = np.zeros((0, 2 * d), np.float32)  # (N, 2d) [(ref @ W_diff - w_1) L, ref] per device

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        self.ref_cat = np.zeros((n_devices, self.w_cat.shape[1]), np.float32)
        if behaviour is not None:
            self._set_ref(np.arange(n_devices), behaviour)

    def _set_ref(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        ref = np.asarray(behaviour, dtype=np.float64)
        d = ref.shape[1]
        self.ref_cat[devices, :d] = (ref @ self.w_diff - self.w_const) @ self.root
        self.ref_cat[devices, d:] = ref

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        super().applied(devices, behaviour)
        self._set_ref(devices, behaviour)

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        y = view.behaviour @ self.w_cat - self.ref_cat[view.devices]  # (n, 2d): [mean @ L, b - ref]
        sq = (y * y) @ self.sel  # (n, 2): mean' S mean, |b - ref|^2
        spread = np.power(sq[:, 1:].astype(np.float64) + _EPS, self.var_power) @ self.var_weight  # (n,)
        return np.sqrt(sq[:, 0] + spread)

    def score_one(self, view: StepView, device: int, age: int) -> float:
        # A device's per-step path: four numpy calls (each costs about a microsecond on arrays
        # this small, more than the arithmetic it does), the rest in Python floats.
        y = view.behaviour[0] @ self.w_cat - self.ref_cat[device]
        shift, moved = (np.square(y) @ self.sel).tolist()
        at = (math.log(moved + _EPS) - _LOG_EPS) / _TABLE_STEP
        i = int(at)
        if 0 <= i < _TABLE_SIZE - 1:
            lo = self._log_spread[i]
            return math.sqrt(shift + math.exp(lo + (at - i) * (self._log_spread[i + 1] - lo)))
        return math.sqrt(shift + float(np.power(moved + _EPS, self.var_power) @ self.var_weight))

    def describe(self) -> dict:
        return {**super().describe(), "mapper": self.mapper.meta}


ITEM_TABLE = "item_emb.weight"  # the device model's item embeddings, under their PyTorch name in the graph


def item_embeddings(package) -> np.ndarray:
    """The (n_items + 1, d) item embedding table of a device package's graph (what scores dot with)."""
    table = package.weights(ITEM_TABLE)[ITEM_TABLE]
    want = (package.n_items + 1, package.hidden)
    if table.shape != want:
        raise InvalidInput("package", f"item embeddings of shape {table.shape}, expected {want}, in {package.path}")
    return table.astype(np.float32)

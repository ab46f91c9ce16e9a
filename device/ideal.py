"""The IDEAL-style gate (Lv et al., WWW 2024): request when a fresh bundle would move the ranking.

A distribution mapper turns what the device knows - its behaviour embedding now and when the held
bundle was generated - into a Gaussian over the change a fresh bundle would make to the user
state; draws from it re-score the last candidates, and the gate's score is the expected
disagreement with the current scores. Numpy only, like every gate; the mapper's weights are
fitted offline on validation devices (`paramcast.simulation.calibration.fit_gaussian_mapper`) and
shipped to devices as a small .npz file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.device.policy import Gate, StepView

_EPS = 1e-6  # keeps log |change|^2 finite right after a bundle (change = 0)


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
    """Expected disagreement between the current scores and scores under sampled fresh user states.

    The mapper turns (behaviour now, behaviour at the held bundle) into a Gaussian over the change
    a fresh bundle would make to the user state; `samples` draws re-score the last candidates
    (user state + change, dotted with their embeddings), and the score is the mean total
    variation distance between the softmax over candidates now and under each draw: the share of
    the recommendation mass that would move if the device asked now. Needs the item embedding
    table the scores are dot products with (`item_embeddings(package)` reads it from a package).

    For speed the mapper is applied in a factored form: with x = [b - ref, b, 1],
    mean = b @ (W_diff + W_b) - (ref @ W_diff - w_1), where the bracket is fixed while a bundle is
    held and computed when it arrives; and with z = [log(|b - ref|^2 + eps), 1],
    sd = exp(log_var / 2) = exp(w_1 / 2) * (|b - ref|^2 + eps) ** (w_0 / 2).
    """

    name = "ideal"
    params = {**Gate.params, "samples": int}

    def __init__(self, mapper: GaussianMapper, item_emb: np.ndarray, threshold: float | None = None,
                 rate: float | None = None, min_interval: int = 1, pace: float = 0.0, burst: float = 1.0,
                 samples: int = 8):
        super().__init__(threshold, rate, min_interval, pace, burst)
        if samples < 1:
            raise InvalidInput("samples", f"must be >= 1, got {samples}")
        d = item_emb.shape[1]
        if mapper.w_mean.shape != (2 * d + 1, d) or mapper.w_log_var.shape != (2, d):
            raise InvalidInput("mapper", f"expects hidden size {mapper.hidden}, items have {d}")
        self.mapper, self.samples = mapper, samples
        self.item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)  # (n_items + 1, d)
        w = mapper.w_mean.astype(np.float32)
        self.w_diff, self.w_b = w[:d], w[:d] + w[d:2 * d]  # (d, d) each
        self.w_const = w[2 * d]  # (d,)
        self.sd_exp = (0.5 * mapper.w_log_var[0]).astype(np.float32)  # (d,)
        self.sd_scale = np.exp(0.5 * mapper.w_log_var[1]).astype(np.float32)  # (d,)
        self.ref = np.zeros((0, d), np.float32)  # (N, d) behaviour at the held bundle
        self.ref_term = np.zeros((0, d), np.float32)  # (N, d) ref @ W_diff - w_1
        self.draws = np.zeros((0, samples, d), np.float32)  # (N, S, d) standard normals
        self._rows = np.zeros((samples + 1, d), np.float32)  # score_one's changes: none, then each draw

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        d = self.item_emb.shape[1]
        self.ref = np.zeros((n_devices, d), np.float32)
        self.ref_term = np.zeros((n_devices, d), np.float32)
        self.draws = self.rng.standard_normal((n_devices, self.samples, d), dtype=np.float32)
        if behaviour is not None:
            self._set_ref(np.arange(n_devices), behaviour)

    def _set_ref(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        ref = np.asarray(behaviour, dtype=np.float32)
        self.ref[devices] = ref
        self.ref_term[devices] = ref @ self.w_diff - self.w_const

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        super().applied(devices, behaviour)
        self._set_ref(devices, behaviour)
        # Fresh draws per bundle: within one bundle's life the gate compares like with like
        # (common random numbers), and no normals are drawn on the per-step path.
        self.draws[devices] = self.rng.standard_normal((len(devices), *self.draws.shape[1:]), dtype=np.float32)

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        dev, b, s = view.devices, view.behaviour, view.scores
        diff = b - self.ref[dev]  # (n, d)
        mean = b @ self.w_b - self.ref_term[dev]  # (n, d)
        sd = self.sd_scale * (np.einsum("nd,nd->n", diff, diff)[:, None] + _EPS) ** self.sd_exp  # (n, d)
        change = mean[:, None, :] + sd[:, None, :] * self.draws[dev]  # (n, S, d)
        emb = self.item_emb.take(view.candidates, axis=0)  # (n, C, d)
        moved = change @ emb.transpose(0, 2, 1)  # (n, S, C): score change of each candidate per draw
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p = (p / p.sum(axis=1, keepdims=True))[:, None, :]  # (n, 1, C) softmax now
        q = p * np.exp(np.minimum(moved, 60.0))  # softmax(s + moved) up to its sum; the cap keeps float32 finite
        q /= q.sum(axis=2, keepdims=True)  # (n, S, C)
        return 0.5 * np.abs(q - p).sum(axis=2).mean(axis=1)  # (n,) mean total variation

    def score_one(self, view: StepView, device: int, age: int) -> float:
        # A device's per-step path, written for the fewest numpy calls (each costs about a
        # microsecond on arrays this small): one matrix product scores the candidates now (row 0,
        # a zero change) and under every draw (rows 1..S); the exponential is taken in float64,
        # so no max needs subtracting; the total variation is 1 - sum(min(q, p)).
        b = view.behaviour[0]
        diff = b - self.ref[device]  # (d,)
        rows = self._rows  # (S + 1, d): row 0 stays zero
        np.multiply(self.draws[device], self.sd_scale * (float(diff @ diff) + _EPS) ** self.sd_exp, out=rows[1:])
        rows[1:] += b @ self.w_b - self.ref_term[device]  # mean + sd * draw
        logits = rows @ self.item_emb.take(view.candidates[0], axis=0).T  # (S + 1, C)
        logits += view.scores[0]
        q = np.exp(logits, dtype=np.float64)
        q /= q.sum(axis=1, keepdims=True)  # q[0] = p, the softmax now
        tv = 1.0 - float(np.minimum(q[1:], q[0]).sum()) / self.samples
        if 0.0 <= tv < 1.0:
            return tv
        # Scores or changes beyond float64's exponent (|logit| > ~700): the shifted, capped form.
        return float(self.score(view, np.array([age]))[0])

    def describe(self) -> dict:
        return {**super().describe(), "samples": self.samples, "mapper": self.mapper.meta}


ITEM_TABLE = "item_emb.weight"  # the device model's item embeddings, under their PyTorch name in the graph


def item_embeddings(package) -> np.ndarray:
    """The (n_items + 1, d) item embedding table of a device package's graph (what scores dot with)."""
    table = package.weights(ITEM_TABLE)[ITEM_TABLE]
    want = (package.n_items + 1, package.hidden)
    if table.shape != want:
        raise InvalidInput("package", f"item embeddings of shape {table.shape}, expected {want}, in {package.path}")
    return table.astype(np.float32)

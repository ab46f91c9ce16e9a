"""Request policies: when a device asks the cloud for a fresh DeltaBundle.

A device holds a bundle generated from its behaviour window at some earlier step. Each step it
scores candidates with the parameters it holds, then observes what its user did, then its policy
decides whether to call Generate with the window up to now. Requesting on every step keeps the
parameters fresh at the price of one bundle per interaction; a gate spends a request budget on
the steps where the held bundle has gone stale.

Everything here is numpy: it runs on the device beside ONNX Runtime. A gate adds no model run of
its own; it reads what the scoring call just returned (the graph's `behaviour` output - the
backbone's state of the scored history -, its `user_state` and `scores`) plus the candidates and
which of them the user took. Policies are vectorised over a fleet of devices (`StepView.devices`
names the rows), so the simulation harness drives thousands of devices per call and a real device
is a fleet of one.

Policies, written as `NAME[:params]` (`key=value` pairs separated by commas, or one bare value for
the policy's primary parameter, e.g. `every-k:10`, `random-p:0.1`, `drift:rate=0.1`):

  never         keep the bundle the device enrolled with
  always        request after every step
  every-k:K     request once K steps have passed since the last request; each device starts at a
                random phase (`phase=0` aligns them), so the fleet requests on 1/K of its steps
  random-p:P    request with probability P after each step
  drift         distance between the behaviour embedding now and when the held bundle was
                generated (`metric=cosine|l2`)
  window        the share of the behaviour window (the generator's last `size` interactions) the
                held bundle has not seen
  loss          the device model's recent loss (1 - NDCG of the rank it gave the item the user
                took) since the held bundle arrived (`decay` of the running mean)
  ideal         IDEAL-style (Lv et al., WWW 2024): a distribution mapper turns what the device
                knows into a Gaussian over the change a fresh bundle would make to the user state;
                `samples` draws from it re-score the candidates, and the gate is the expected
                disagreement (total variation between the candidate distributions) with the
                current scores. The mapper is fitted on validation devices (`fit_gaussian_mapper`).

Every gate takes `threshold=T` (request when its score exceeds T) or `rate=R` (the threshold is
calibrated on validation devices so the fleet requests on R of its steps; a bare value means
`rate`), and optionally `pace=X`: each device earns X * R requests per step (banking at most
`burst`, default 1) and the gate picks when to spend them. Every policy takes `min_interval=M`:
at least M steps between two requests of a device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paramcast.common.errors import InvalidInput

# ---------------------------------------------------------------------------------------------
# What a device knows at a decision point
# ---------------------------------------------------------------------------------------------


@dataclass
class StepView:
    """The decision-time view of n devices: the scoring call they just made and what their users did.

    n = devices deciding now, d = hidden size, C = candidates scored.
    """

    devices: np.ndarray  # (n,) int64 rows of the fleet
    behaviour: np.ndarray  # (n, d) backbone state of the history that was scored
    user_state: np.ndarray  # (n, d) the adapted head's output the scores are dot products with
    scores: np.ndarray  # (n, C) what the held parameters gave each candidate
    candidates: np.ndarray  # (n, C) int64 item ids
    observed: np.ndarray  # (n,) int64 column of the item the user took; -1 when it was not a candidate
    seen: np.ndarray | None = None  # (n,) int64 interactions seen so far, the one just observed included

    @classmethod
    def single(cls, behaviour, user_state, scores, candidates, observed: int = -1, device: int = 0,
               seen: int | None = None) -> StepView:
        """One device's view from the outputs of one scoring call (1-D arrays)."""
        return cls(np.array([device], dtype=np.int64), np.asarray(behaviour, np.float32)[None],
                   np.asarray(user_state, np.float32)[None], np.asarray(scores, np.float32)[None],
                   np.asarray(candidates, np.int64)[None], np.array([observed], dtype=np.int64),
                   None if seen is None else np.array([seen], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.devices)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------
#
# The decision path is written for cost: a device runs it after every interaction, and it must
# stay a small fraction of one scoring call. Every numpy call on a small array costs about a
# microsecond, so the code keeps their number low (state the gates need is prepared when a
# bundle arrives, not at every step) rather than splitting the arithmetic into tidy helpers.


_ONE = 1.0 - 1e-9  # a request's cost in tokens, less a rounding margin (ten times 0.1 is 0.999...)


class Policy:
    """Base class: per-device age since the last request, and the minimum interval between requests.

    Lifecycle: `start(n_devices, seed, behaviour)` once (the devices hold their enrolment bundle,
    or none when `behaviour` is None); then per step `decide(view)` for the devices that just
    observed an item, and `applied(devices, behaviour)` when bundles requested with those
    behaviour embeddings became active.
    """

    name = ""
    primary: str | None = None  # the parameter a bare value sets, as in `every-k:10`
    params: dict[str, type] = {"min_interval": int}

    def __init__(self, min_interval: int = 1):
        if min_interval < 1:
            raise InvalidInput("min_interval", f"must be >= 1, got {min_interval}")
        self.min_interval = min_interval
        self.age = np.zeros(0, dtype=np.int64)  # (N,) decisions since the device's last request
        self.holds = np.zeros(0, dtype=bool)  # (N,) the device holds a bundle
        self.all_hold = True  # every device holds one (the common case: skips a per-step check)
        self.rng = np.random.default_rng(0)
        self.allowance = 0.0  # requests a device earns per step when paced (0: not paced)
        self.burst = 1.0  # most requests a paced device can bank
        self.tokens = np.zeros(0)  # (N,) requests each paced device has in hand

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        """Fresh state for a fleet; `behaviour` (N, d) is what each enrolment bundle was generated at
        and `seen` (N,) how many interactions each device had seen when it enrolled."""
        self.rng = np.random.default_rng(seed)
        self.age = np.zeros(n_devices, dtype=np.int64)
        self.tokens = np.zeros(n_devices)  # a device has just enrolled: it starts with none in hand
        self.holds = np.full(n_devices, behaviour is not None)
        self.all_hold = behaviour is not None

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        """(n,) bool: would these devices request now (`age`: decisions since their last request,
        this one included), before the minimum interval is applied."""
        raise NotImplementedError

    def want_one(self, view: StepView, device: int, age: int) -> bool:
        """`want` for a view of one device; gates override it with scalar code (see `decide`)."""
        return bool(self.want(view, np.array([age]))[0])

    def decide(self, view: StepView) -> np.ndarray:
        """(n,) bool: which of the view's devices request a bundle now.

        A view of one device - what a real device decides every step - takes a scalar path: on
        arrays this small, each numpy call costs more than the arithmetic it does.
        """
        dev = view.devices
        if len(dev) == 1:
            i = int(dev[0])
            age1 = int(self.age[i]) + 1
            want = self.want_one(view, i, age1) and age1 >= self.min_interval
            if self.allowance:
                tokens = min(float(self.tokens[i]) + self.allowance, self.burst)
                want = want and tokens >= _ONE
                self.tokens[i] = tokens - 1.0 if want else tokens
            self.age[i] = 0 if want else age1
            return np.array([want])
        age = self.age[dev] + 1
        request = self.want(view, age)
        if self.min_interval > 1:
            request &= age >= self.min_interval
        if self.allowance:
            tokens = np.minimum(self.tokens[dev] + self.allowance, self.burst)
            request &= tokens >= _ONE
            tokens[request] -= 1.0
            self.tokens[dev] = tokens
        age[request] = 0
        self.age[dev] = age
        return request

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        """Bundles requested at `behaviour` (m, d) are now active on `devices` (m,)."""
        if not self.all_hold:
            self.holds[devices] = True
            self.all_hold = bool(self.holds.all())

    def describe(self) -> dict:
        return {"name": self.name, "min_interval": self.min_interval}


class Never(Policy):
    name = "never"

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        return np.zeros(len(view), dtype=bool)


class Always(Policy):
    name = "always"

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        return np.ones(len(view), dtype=bool)


class EveryK(Policy):
    name = "every-k"
    primary = "k"
    params = {"k": int, "phase": str, "min_interval": int}

    def __init__(self, k: int, phase: str = "random", min_interval: int = 1):
        super().__init__(min_interval)
        if k < 1:
            raise InvalidInput("k", f"must be >= 1, got {k}")
        if phase not in ("random", "0"):
            raise InvalidInput("phase", f"must be 'random' or '0', got {phase!r}")
        self.k, self.phase = k, phase

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        if self.phase == "random":  # devices enrol at different times; their schedules are not aligned
            self.age = self.rng.integers(0, self.k, size=n_devices)

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        if self.all_hold:
            return age >= self.k
        return (age >= self.k) | ~self.holds[view.devices]

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k, "phase": self.phase}


class RandomP(Policy):
    name = "random-p"
    primary = "p"
    params = {"p": float, "min_interval": int}

    def __init__(self, p: float, min_interval: int = 1):
        super().__init__(min_interval)
        if not 0.0 <= p <= 1.0:
            raise InvalidInput("p", f"must be in [0, 1], got {p}")
        self.p = p

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        return self.rng.random(len(view)) < self.p

    def describe(self) -> dict:
        return {**super().describe(), "p": self.p}


# ---------------------------------------------------------------------------------------------
# Gates: a score per device, compared with a threshold
# ---------------------------------------------------------------------------------------------


class Gate(Policy):
    """A policy that requests when `score(view, age)` exceeds `threshold`.

    A device holding no bundle scores +inf (anything beats the base model). Until a threshold is
    set (`threshold=` or calibration to `rate=`), `decide` refuses to run.

    Pacing (`pace=X`, with `rate=R`): each device earns X * R requests per step and banks at most
    `burst` of them; the gate only decides *when* a device spends one. Without it, one threshold
    for the whole fleet lets devices whose behaviour is always moving take most of the budget
    while steadier devices keep a bundle from long ago.
    """

    primary = "rate"
    params = {"threshold": float, "rate": float, "min_interval": int, "pace": float, "burst": float}

    def __init__(self, threshold: float | None = None, rate: float | None = None, min_interval: int = 1,
                 pace: float = 0.0, burst: float = 1.0):
        super().__init__(min_interval)
        if threshold is not None and rate is not None:
            raise InvalidInput("policy", f"{self.name}: give threshold or rate, not both")
        if rate is not None and not 0.0 < rate <= 1.0:
            raise InvalidInput("rate", f"must be in (0, 1], got {rate}")
        if pace and rate is None:
            raise InvalidInput("pace", f"{self.name}: pacing needs the fleet's rate (rate=R)")
        if pace < 0 or (pace and pace * rate < 1e-6):  # type: ignore[operator]
            raise InvalidInput("pace", f"must be positive, got {pace}")
        if burst < 1.0:
            raise InvalidInput("burst", f"must be >= 1 (a request costs one), got {burst}")
        self.threshold = threshold
        self.target_rate = rate
        self.pace = pace
        self.allowance = pace * rate if pace else 0.0  # type: ignore[operator]
        self.burst = burst
        self.last_score = np.zeros(0)  # (n,) scores of the latest decision, kept for calibration

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        """(n,) float: higher = the held bundle is more likely stale."""
        raise NotImplementedError

    def score_one(self, view: StepView, device: int, age: int) -> float:
        """`score` for a view of one device (row `device`); gates override it with scalar code."""
        return float(self.score(view, np.array([age]))[0])

    def want(self, view: StepView, age: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise InvalidInput("threshold", f"{self.name}: not calibrated; give threshold= or calibrate to rate=")
        s = self.score(view, age)
        if not self.all_hold:
            s = np.where(self.holds[view.devices], s, np.inf)
        self.last_score = s
        return s > self.threshold

    def want_one(self, view: StepView, device: int, age: int) -> bool:
        if self.threshold is None:
            raise InvalidInput("threshold", f"{self.name}: not calibrated; give threshold= or calibrate to rate=")
        s = self.score_one(view, device, age) if self.all_hold or self.holds[device] else math.inf
        self.last_score = np.array([s])
        return s > self.threshold

    def describe(self) -> dict:
        out = {**super().describe(), "threshold": self.threshold, "target_rate": self.target_rate}
        return {**out, "pace": self.pace, "burst": self.burst} if self.pace else out


class DriftGate(Gate):
    """Distance between the behaviour embedding now and the one the held bundle was generated at
    (`cosine`: 1 - cosine similarity; `l2`: Euclidean distance)."""

    name = "drift"
    params = {**Gate.params, "metric": str}

    def __init__(self, threshold: float | None = None, rate: float | None = None, min_interval: int = 1,
                 pace: float = 0.0, burst: float = 1.0, metric: str = "cosine"):
        super().__init__(threshold, rate, min_interval, pace, burst)
        if metric not in ("cosine", "l2"):
            raise InvalidInput("metric", f"must be 'cosine' or 'l2', got {metric!r}")
        self.metric = metric
        self.ref = np.zeros((0, 0), dtype=np.float32)  # (N, d) behaviour at the held bundle (unit length for cosine)

    def _reference(self, behaviour: np.ndarray) -> np.ndarray:
        ref = np.asarray(behaviour, dtype=np.float32)
        if self.metric == "cosine":
            ref = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        return ref

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        self.ref = np.zeros((n_devices, 0), np.float32) if behaviour is None else self._reference(behaviour)

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        super().applied(devices, behaviour)
        if self.ref.shape[1] == 0:  # first bundle of a fleet that started without any
            self.ref = np.zeros((len(self.holds), behaviour.shape[1]), dtype=np.float32)
        self.ref[devices] = self._reference(behaviour)

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        if self.ref.shape[1] == 0:
            return np.full(len(view), np.inf)
        b, ref = view.behaviour, self.ref[view.devices]  # (n, d) each
        if self.metric == "l2":
            diff = b - ref
            return np.sqrt(np.einsum("nd,nd->n", diff, diff))
        both = np.einsum("nd,nkd->nk", b, np.stack([b, ref], axis=1))  # (n, 2): |b|^2 and b . ref_unit
        return 1.0 - both[:, 1] / np.sqrt(np.maximum(both[:, 0], 1e-24))

    def score_one(self, view: StepView, device: int, age: int) -> float:
        if self.ref.shape[1] == 0:
            return math.inf
        b, ref = view.behaviour[0], self.ref[device]
        if self.metric == "l2":
            diff = b - ref
            return math.sqrt(float(diff @ diff))
        return 1.0 - float(b @ ref) / math.sqrt(max(float(b @ b), 1e-24))

    def describe(self) -> dict:
        return {**super().describe(), "metric": self.metric}


class WindowGate(Gate):
    """Share of the behaviour window the held bundle has not seen.

    A bundle is a function of the window it was generated from (the last `size` interactions,
    the generator's window). With `seen` interactions now and `seen_at` when the bundle was
    asked for, min(seen - seen_at, size) of the min(seen, size) items in today's window are new
    to it: early in a device's life a few interactions replace much of the window, later the same
    number barely moves it, so requests come often at first and then at a steady pace. Needs
    `StepView.seen`.
    """

    name = "window"
    params = {**Gate.params, "size": int}

    def __init__(self, threshold: float | None = None, rate: float | None = None, min_interval: int = 1,
                 pace: float = 0.0, burst: float = 1.0, size: int = 50):
        super().__init__(threshold, rate, min_interval, pace, burst)
        if size < 1:
            raise InvalidInput("size", f"must be >= 1, got {size}")
        self.size = size
        self.seen_now = np.zeros(0)  # (N,) interactions seen at the latest decision
        self.seen_at = np.zeros(0)  # (N,) interactions seen when the held bundle was asked for; NaN: unknown

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        self.seen_now = np.zeros(n_devices)
        # Unknown enrolment point: the device enrolled right before its first decision.
        self.seen_at = np.full(n_devices, np.nan) if seen is None else np.asarray(seen, np.float64).copy()

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        super().applied(devices, behaviour)
        self.seen_at[devices] = self.seen_now[devices]

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        if view.seen is None:
            raise InvalidInput("seen", "the window gate needs StepView.seen (interactions seen so far)")
        dev, seen = view.devices, view.seen.astype(np.float64)
        self.seen_now[dev] = seen
        at = self.seen_at[dev]
        at = np.where(np.isnan(at), seen - 1.0, at)
        self.seen_at[dev] = at
        return np.minimum(seen - at, self.size) / np.minimum(seen, self.size)

    def score_one(self, view: StepView, device: int, age: int) -> float:
        if view.seen is None:
            raise InvalidInput("seen", "the window gate needs StepView.seen (interactions seen so far)")
        seen = float(view.seen[0])
        self.seen_now[device] = seen
        at = float(self.seen_at[device])
        if at != at:  # NaN: first decision, the device enrolled one interaction ago
            at = self.seen_at[device] = seen - 1.0
        return min(seen - at, self.size) / min(seen, self.size)

    def describe(self) -> dict:
        return {**super().describe(), "size": self.size}


def observed_loss(scores: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """(n,) ranking loss of the observed column: 1 - NDCG of its rank among the candidates (0 when
    ranked first, towards 1 when ranked last; ties count against it). NaN where observed is -1."""
    took = scores[np.arange(len(observed)), observed]  # (n,); -1 picks a real column, masked below
    rank = (scores >= took[:, None]).sum(axis=1) - 1  # candidates scored at least as high, itself excluded
    loss = 1.0 - 1.0 / np.log2(rank + 2.0)
    return np.where(observed >= 0, loss, np.nan)


class LossGate(Gate):
    """Running mean of the device model's loss on what its users took, since the held bundle arrived.

    The loss is 1 - NDCG of the taken item's rank among the scored candidates. The mean is an
    exponential average restarted at every bundle and bias-corrected (sum / total weight), so a
    bundle that fits badly shows up after a step or two rather than being diluted by older ones.
    Steps where the taken item was not among the candidates (observed = -1) leave it unchanged.
    """

    name = "loss"
    params = {**Gate.params, "decay": float}

    def __init__(self, threshold: float | None = None, rate: float | None = None, min_interval: int = 1,
                 pace: float = 0.0, burst: float = 1.0, decay: float = 0.7):
        super().__init__(threshold, rate, min_interval, pace, burst)
        if not 0.0 <= decay < 1.0:
            raise InvalidInput("decay", f"must be in [0, 1), got {decay}")
        self.decay = decay
        self.acc = np.zeros((0, 2))  # (N, 2): decayed sum of losses, decayed sum of weights
        self.gain = np.zeros(0)  # 1 - NDCG by rank, looked up instead of computed per step

    def start(self, n_devices: int, seed: int = 0, behaviour: np.ndarray | None = None,
              seen: np.ndarray | None = None) -> None:
        super().start(n_devices, seed, behaviour, seen)
        self.acc = np.zeros((n_devices, 2))
        self.gain = np.zeros(0)

    def applied(self, devices: np.ndarray, behaviour: np.ndarray) -> None:
        super().applied(devices, behaviour)
        self.acc[devices] = 0.0

    def score(self, view: StepView, age: np.ndarray) -> np.ndarray:
        scores, observed = view.scores, view.observed
        if len(self.gain) != scores.shape[1]:
            self.gain = 1.0 - 1.0 / np.log2(np.arange(scores.shape[1]) + 2.0)
        took = scores[np.arange(len(observed)), observed]  # (n,)
        rank = (scores >= took[:, None]).sum(axis=1) - 1  # (n,)
        step = np.empty((len(observed), 2))
        step[:, 0] = self.gain.take(rank)
        step[:, 1] = 1.0
        held = self.acc[view.devices]  # (n, 2)
        acc = held * self.decay + step * (1.0 - self.decay)
        if observed.min() < 0:  # the taken item was not a candidate: that device learns nothing
            acc[observed < 0] = held[observed < 0]
        self.acc[view.devices] = acc
        return acc[:, 0] / np.maximum(acc[:, 1], 1e-12)

    def score_one(self, view: StepView, device: int, age: int) -> float:
        scores, taken = view.scores[0], int(view.observed[0])
        if len(self.gain) != len(scores):
            self.gain = 1.0 - 1.0 / np.log2(np.arange(len(scores)) + 2.0)
        acc = self.acc[device]  # a view: updated in place
        if taken >= 0:
            rank = int(np.count_nonzero(scores >= scores[taken])) - 1
            acc[0] = self.decay * acc[0] + (1.0 - self.decay) * self.gain[rank]
            acc[1] = self.decay * acc[1] + (1.0 - self.decay)
        return float(acc[0] / acc[1]) if acc[1] > 0 else 0.0

    def describe(self) -> dict:
        return {**super().describe(), "decay": self.decay}


# ---------------------------------------------------------------------------------------------
# The IDEAL-style gate
# ---------------------------------------------------------------------------------------------


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


_EPS = 1e-6  # keeps log |change|^2 finite right after a bundle (change = 0)
# E[log chi^2_1]: the mean of log(r^2) for r ~ N(0, 1); fitting log-variance to log squared
# residuals is biased down by this much.
_LOG_CHI2_MEAN = -1.2703628454614782


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


def fit_gaussian_mapper(behaviour: np.ndarray, ref: np.ndarray, delta: np.ndarray,
                        ridge: float = 1.0) -> GaussianMapper:
    """Fit the mapper on examples from validation devices, in closed form.

    behaviour, ref (n, d): behaviour now and at the held bundle; delta (n, d): how much a bundle
    generated now would change the user state (fresh - held). The mean is a ridge regression;
    the log-variance regresses log squared residuals on the variance features (heteroscedastic
    least squares), corrected for the log-chi-square bias.
    """
    x, z = mapper_features(behaviour, ref)
    x64, z64, y = x.astype(np.float64), z.astype(np.float64), delta.astype(np.float64)
    gram = x64.T @ x64 + ridge * np.eye(x64.shape[1])
    w_mean = np.linalg.solve(gram, x64.T @ y)  # (2d + 1, d)
    resid = y - x64 @ w_mean
    target = np.log(resid * resid + 1e-10) - _LOG_CHI2_MEAN  # (n, d)
    w_log_var = np.linalg.lstsq(z64, target, rcond=None)[0]  # (2, d)
    explained = 1.0 - float((resid**2).sum() / max(((y - y.mean(0)) ** 2).sum(), 1e-12))
    return GaussianMapper(w_mean.astype(np.float32), w_log_var.astype(np.float32),
                          {"examples": len(y), "r2_mean": explained, "ridge": ridge})


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
        b, s = view.behaviour[0], view.scores[0]
        diff = b - self.ref[device]  # (d,)
        mean = b @ self.w_b - self.ref_term[device]  # (d,)
        sd = self.sd_scale * (float(diff @ diff) + _EPS) ** self.sd_exp  # (d,)
        emb = self.item_emb.take(view.candidates[0], axis=0)  # (C, d)
        moved = (mean + sd * self.draws[device]) @ emb.T  # (S, C)
        p = np.exp(s - s.max())
        p /= p.sum()  # (C,)
        q = p * np.exp(np.minimum(moved, 60.0))
        q /= q.sum(axis=1, keepdims=True)  # (S, C)
        return 0.5 * float(np.abs(q - p).sum()) / self.samples

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


# ---------------------------------------------------------------------------------------------
# Specs and calibration
# ---------------------------------------------------------------------------------------------

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Never, Always, EveryK, RandomP, DriftGate, WindowGate, LossGate, IdealGate)
}
GATES = tuple(name for name, cls in POLICIES.items() if issubclass(cls, Gate))


@dataclass(frozen=True)
class PolicySpec:
    """A parsed `NAME[:params]`: the policy's name and typed parameters."""

    name: str
    params: dict
    text: str

    @property
    def is_gate(self) -> bool:
        return self.name in GATES

    @property
    def rate_free(self) -> bool:
        """True when the spec fixes nothing that sets its request rate, so a budget applies to it."""
        if self.name in ("never", "always"):
            return False
        return not ({"k", "p", "rate", "threshold"} & set(self.params))

    def at_budget(self, budget: float) -> PolicySpec:
        """This spec with its rate set to `budget` (k = 1/budget for every-k, p = budget for random-p)."""
        if not self.rate_free:
            return self
        if not 0.0 < budget <= 1.0:
            raise InvalidInput("budget", f"must be in (0, 1], got {budget}")
        key, value = {"every-k": ("k", max(1, round(1.0 / budget))), "random-p": ("p", budget)}.get(
            self.name, ("rate", budget))
        params = {**self.params, key: value}
        return PolicySpec(self.name, params, format_spec(self.name, params))


def format_spec(name: str, params: dict) -> str:
    if not params:
        return name
    return f"{name}:" + ",".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_policy(text: str) -> PolicySpec:
    """`NAME[:params]` -> PolicySpec; raises InvalidInput naming what is wrong."""
    name, _, rest = text.strip().partition(":")
    if name not in POLICIES:
        raise InvalidInput("policy", f"unknown policy {name!r} in {text!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    params: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            if cls.primary is None or params:
                raise InvalidInput("policy", f"{text!r}: {name} takes no bare value; use key=value "
                                             f"with keys {sorted(cls.params)}")
            key, value = cls.primary, part
        key = key.strip()
        if key not in cls.params:
            raise InvalidInput("policy", f"{text!r}: {name} has no parameter {key!r}; it takes {sorted(cls.params)}")
        kind = cls.params[key]
        try:
            params[key] = kind(value.strip())
        except ValueError:
            raise InvalidInput("policy", f"{text!r}: {key} must be {kind.__name__}, got {value!r}") from None
    return PolicySpec(name, params, text.strip())


def build_policy(spec: PolicySpec, mapper: GaussianMapper | None = None,
                 item_emb: np.ndarray | None = None, window: int | None = None) -> Policy:
    """Instantiate a spec. The ideal gate needs the fitted mapper and the item embedding table; the
    window gate takes the generator's window length as its default `size`."""
    cls = POLICIES[spec.name]
    params = dict(spec.params)
    if spec.name == "window" and "size" not in params and window:
        params["size"] = window
    if spec.name == "every-k" and "k" not in params:
        raise InvalidInput("policy", f"{spec.text!r}: every-k needs k (every-k:10) or a --budget")
    if spec.name == "random-p" and "p" not in params:
        raise InvalidInput("policy", f"{spec.text!r}: random-p needs p (random-p:0.1) or a --budget")
    if spec.name == "ideal":
        if mapper is None or item_emb is None:
            raise InvalidInput("policy", "ideal needs a fitted distribution mapper and the item embeddings")
        return IdealGate(mapper, item_emb, **params)
    return cls(**params)


def calibrate_threshold(rate_at: Callable[[float], float], target: float, scores: np.ndarray,
                        tolerance: float | None = None, max_iter: int = 30) -> tuple[float, float]:
    """Threshold at which `rate_at(threshold)` (the request rate a replay reaches) meets `target`.

    `scores` are gate scores seen on the same devices (e.g. in a replay that never requests) and
    bracket the search; bisection runs over their quantiles, because the rate is monotone in the
    threshold but gate scores are far from uniformly spread. Returns (threshold, rate reached):
    the lowest-threshold point whose rate does not exceed the target unless none is within
    tolerance (default: 3% of the target, at least 0.001), in which case the closest one.
    """
    if tolerance is None:
        tolerance = max(0.001, 0.03 * target)
    finite = np.sort(scores[np.isfinite(scores)])
    if len(finite) == 0:
        raise InvalidInput("scores", "no finite gate scores to calibrate on")

    def at(q: float) -> float:
        return float(np.quantile(finite, q))

    lo, hi = 0.0, 1.0  # quantile bracket: rate_at(at(lo)) >= target >= rate_at(at(hi)) hopefully
    best: tuple[float, float] | None = None
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        threshold = at(mid)
        rate = rate_at(threshold)
        if best is None or abs(rate - target) < abs(best[1] - target):
            best = (threshold, rate)
        if abs(rate - target) <= tolerance:
            return threshold, rate
        if rate > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1.0 / (4 * len(finite)):
            break
    assert best is not None
    return best

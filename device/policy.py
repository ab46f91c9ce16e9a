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
                the gate is how far that change would spread the items' scores apart, in
                expectation, in closed form (`device/ideal.py`; the mapper is fitted offline on
                validation devices, `paramcast.simulation.calibration`).

Every gate takes `threshold=T` (request when its score exceeds T) or `rate=R` (the threshold is
calibrated on validation devices so the fleet requests on R of its steps; a bare value means
`rate`), and optionally `pace=X`: each device earns X * R requests per step (banking at most
`burst`, default 1) and the gate picks when to spend them. Every policy takes `min_interval=M`:
at least M steps between two requests of a device.

Where the pieces live: this module holds what a device runs at every step (the baselines and the
gates); `device/ideal.py` the IDEAL gate and its mapper; `device/policy_spec.py` the `NAME[:params]`
specs and building a policy from one; `paramcast.simulation.calibration` the offline fitting of
the mapper and of gate thresholds on validation devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    user_state: np.ndarray  # (n, d) the adapted head's output (the device part of what scores dot with)
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

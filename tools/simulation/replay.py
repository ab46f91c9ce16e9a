"""Replaying devices through one policy, all devices advanced together one step at a time.

At step j every device still replaying (a prefix of the rows, see Timelines) scores its step's
candidates with the factors it holds, the metrics of that ranking are recorded, the policy sees
the scoring call's outputs and the observed item, and the devices it picks request a bundle
generated from their window up to and including that item; the bundle is active from step j + 1.
Where the bundles come from is a `Source`: the cache (in-process) or real gRPC calls (network).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from paramcast.cloud.model import Adapters
from paramcast.common.evaluation import metrics_from_scores
from paramcast.device.policy import Gate, Policy, StepView
from paramcast.simulation.cache import Scorer, StepCache
from paramcast.simulation.timelines import Timelines

METRICS = ("ndcg@10", "hr@10", "auc")
STARTS = ("bundle", "base")  # what a device holds after warm-up: its enrolment bundle, or nothing


class Source(Protocol):
    """Where a replaying device's parameters come from."""

    def reset(self, start: str) -> None: ...

    def adapters(self, n: int) -> Adapters | None:
        """Factors held by device rows [0, n), batched."""

    def request(self, devices: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Devices ask for bundles generated right after their flat steps; (m,) bool: which got one."""


@runtime_checkable
class DeviceScoring(Protocol):
    """A Source whose devices score for themselves (device agents on ONNX Runtime) rather than
    through the replay's batched torch scorer."""

    enrol_behaviour: np.ndarray | None  # (D, d) what each enrolment bundle was generated at (after reset)

    def outputs(self, steps: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Devices [0, n) score their steps' candidates: (behaviour, user_state, scores)."""


class CacheSource:
    """In-process: a request is served from the cached bundle of that step."""

    def __init__(self, cache: StepCache, n_devices: int):
        self.cache, self.n_devices = cache, n_devices
        self.held = np.zeros(n_devices, dtype=np.int64)  # (D,) row of the FactorTable each device holds

    def reset(self, start: str) -> None:
        if start == "bundle" and self.cache.table is None:
            raise ValueError("the model has no generator, so devices cannot enrol with a bundle")
        devices = np.arange(self.n_devices)
        self.held = self.cache.enrol_row(devices) if start == "bundle" else np.zeros(self.n_devices, np.int64)

    def adapters(self, n: int) -> Adapters | None:
        if self.cache.table is None:
            return None
        return self.cache.table.gather(self.held[:n])

    def request(self, devices: np.ndarray, steps: np.ndarray) -> np.ndarray:
        if self.cache.table is None:
            return np.zeros(len(devices), dtype=bool)
        self.held[devices] = self.cache.fresh_row(steps, self.n_devices)
        return np.ones(len(devices), dtype=bool)


@dataclass
class Run:
    """One policy replayed over a set of timelines: per-step outcomes (N = steps)."""

    name: str
    policy: dict
    metrics: dict[str, np.ndarray]  # metric -> (N,)
    requested: np.ndarray  # (N,) bool: a request went out right after the step
    received: np.ndarray  # (N,) bool: ... and a bundle came back
    gate: np.ndarray  # (N,) gate score at the step (NaN for policies without one)
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def request_rate(self) -> float:
        return float(self.requested.mean()) if len(self.requested) else 0.0

    def per_device(self, tl: Timelines) -> dict[str, np.ndarray]:
        """metric -> (D,) mean over each device's steps; plus 'requests' per step."""
        out = {m: tl.per_device_mean(v) for m, v in self.metrics.items()}
        out["requests"] = tl.per_device_mean(self.requested)
        return out


def replay(policy: Policy, tl: Timelines, cache: StepCache, scorer: Scorer, source: Source | None = None,
           start: str = "bundle", seed: int = 0, name: str | None = None) -> Run:
    """Replay every device of `tl` under `policy` (fresh state, seeded); returns the per-step outcomes."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    source = source or CacheSource(cache, tl.n_devices)
    source.reset(start)
    devices_score = isinstance(source, DeviceScoring)
    enrol = source.enrol_behaviour if isinstance(source, DeviceScoring) else cache.enrol_behaviour
    policy.start(tl.n_devices, seed, enrol if start == "bundle" else None,
                 np.full(tl.n_devices, tl.warmup) if start == "bundle" else None)
    N = tl.n_steps
    metrics = {m: np.empty(N, dtype=np.float32) for m in METRICS}
    requested = np.zeros(N, dtype=bool)
    received = np.zeros(N, dtype=bool)
    gate = np.full(N, np.nan, dtype=np.float32)
    observed = np.zeros(tl.n_devices, dtype=np.int64)  # the target is candidate column 0
    rows = np.arange(tl.n_devices)
    held_row = np.zeros(N, dtype=np.int64) if isinstance(source, CacheSource) else None
    t0 = time.perf_counter()
    for j in range(tl.max_length):
        n = tl.active(j)
        k = tl.start[:n] + j  # (n,) flat step of each replaying device
        candidates = tl.candidates[k]
        if held_row is not None:
            held_row[k] = source.held[:n]  # type: ignore[attr-defined]
        if devices_score:
            behaviour, user, scores = source.outputs(k, candidates)  # type: ignore[attr-defined]
        else:
            behaviour = cache.behaviour[k]
            user, scores = scorer(behaviour, source.adapters(n), candidates)
        for m, v in metrics_from_scores(scores).items():
            if m in metrics:
                metrics[m][k] = v
        view = StepView(rows[:n], behaviour, user, scores, candidates, observed[:n], tl.t[k] + 1)
        want = policy.decide(view)
        if isinstance(policy, Gate):
            gate[k] = policy.last_score
        if want.any():
            devices = rows[:n][want]
            requested[k[want]] = True
            got = source.request(devices, k[want])
            received[k[want][got]] = True
            policy.applied(devices[got], behaviour[want][got])
    extra = {"held_row": held_row} if held_row is not None else {}
    return Run(name or policy.name, policy.describe(), metrics, requested, received, gate,
               time.perf_counter() - t0, extra)

"""The device loop: score, observe, and let the request policy decide when to ask the cloud.

    loop = DeviceLoop.from_package(agent)              # the policy the package ships (policy.json)
    scores = loop.recommend(candidates)                # one ONNX Runtime run: scores and the gate's inputs
    step = loop.observe(item)                          # extends the window; may request, verify, store, apply
    step = await loop.observe_async(item, aio_client)  # the same on an event loop (many devices per process)

Each `observe` builds the policy's view from what the last scoring run already returned (the
graph's `behaviour` and `user_state` outputs and the scores) and the device's own history, and
calls `Policy.decide`. When the policy asks, the agent requests a bundle for the window through
the client, verifies, stores and applies it (`DeviceAgent.refresh`); offline or refused, the
device keeps its last good bundle or the base model, and the policy is told only about bundles
that became active. The policy's budget is its own: a gate's threshold is calibrated to a request
rate, and pacing (`pace=`) caps what each device spends.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.common.package import MAPPER_FILE, DevicePackage
from paramcast.device.agent import DeviceAgent, Refresh
from paramcast.device.client import AsyncParamClient, ParamClient
from paramcast.device.ideal import GaussianMapper, item_embeddings
from paramcast.device.policy import Gate, Policy, StepView
from paramcast.device.policy_spec import build_policy, parse_policy


@dataclass(frozen=True)
class Step:
    """What one observation did: whether the policy asked, and the refresh outcome if it did."""

    requested: bool
    refresh: Refresh | None = None


def load_policy(package: DevicePackage, spec: str | None = None) -> Policy:
    """The package's shipped policy (`policy.json`, its mapper for the ideal gate), or `spec` instead
    (which may still use the package's mapper and window length).

    A shipped gate given as a rate (`drift:rate=0.1`, pacing included) takes the threshold its
    calibration fitted (`fitted.threshold`), so the device requests at that rate without
    calibrating anything itself.
    """
    entry = package.manifest.get("policy")
    shipped = json.loads(package.files[entry["file"]]) if entry else {}
    text = spec or shipped.get("spec")
    if not text:
        raise InvalidInput("policy", f"the package {package.path} ships no policy; give one (e.g. every-k:10)")
    parsed = parse_policy(text)
    mapper = emb = None
    if parsed.name == "ideal":
        if not entry or "mapper" not in entry:
            raise InvalidInput("policy", "the ideal gate needs the fitted mapper the package ships "
                                         f"({MAPPER_FILE}); this package has none")
        with np.load(io.BytesIO(package.files[entry["mapper"]])) as f:
            mapper = GaussianMapper(f["w_mean"].astype(np.float32), f["w_log_var"].astype(np.float32))
        emb = item_embeddings(package)
    policy = build_policy(parsed, mapper, emb, window=shipped.get("window"))
    fitted = shipped.get("fitted", {}).get("threshold")
    if isinstance(policy, Gate) and policy.threshold is None and text == shipped.get("spec") and fitted is not None:
        policy.threshold = float(fitted)
    return policy


def policy_from_package(agent: DeviceAgent, spec: str | None = None) -> Policy:
    """`load_policy` for the package an agent has open."""
    return load_policy(agent._package(), spec)


class DeviceLoop:
    def __init__(self, agent: DeviceAgent, policy: Policy, client: ParamClient | None = None, seed: int = 0):
        if agent.runtime is None:
            raise InvalidInput("agent", "open() the agent before starting its loop")
        self.agent, self.policy, self.client = agent, policy, client
        self.window: list[int] = []
        self.policy.start(1, seed, None)  # a held bundle's generating behaviour is unknown: treat as none
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # outputs + candidates
        self.requests = self.applied = 0
        self.response_bytes = 0

    @classmethod
    def from_package(cls, agent: DeviceAgent, client: ParamClient | None = None, spec: str | None = None,
                     seed: int = 0) -> DeviceLoop:
        return cls(agent, policy_from_package(agent, spec), client, seed)

    def recommend(self, candidates) -> np.ndarray:
        """(C,) scores of `candidates` for the window so far, from the active bundle or the base model."""
        agent = self.agent
        agent._drop_expired()
        assert agent.runtime is not None
        cands = np.asarray(candidates, dtype=np.int64)
        scores, user, behaviour = agent.runtime.outputs(self.window, cands)
        self._last = (scores, user, behaviour, cands)
        return scores

    def _decide(self, item: int) -> bool:
        if self._last is None:  # nothing was recommended since the last item: score it alone
            self.recommend([item])
        assert self._last is not None
        scores, user, behaviour, cands = self._last
        hits = np.flatnonzero(cands == item)
        view = StepView.single(behaviour, user, scores, cands, observed=int(hits[0]) if len(hits) else -1,
                               seen=len(self.window) + 1)
        self.window.append(int(item))
        self._behaviour = behaviour
        self._last = None
        return bool(self.policy.decide(view)[0])

    def _count(self, outcome: Refresh) -> None:
        self.requests += 1
        self.response_bytes += outcome.response_bytes
        if outcome.applied:
            self.applied += 1
            self.policy.applied(np.zeros(1, dtype=np.int64), self._behaviour[None])

    def observe(self, item: int, client: ParamClient | None = None) -> Step:
        """The user took `item`: extend the window and request a bundle if the policy says so."""
        if not self._decide(item):
            return Step(False)
        client = client or self.client
        if client is None:
            raise InvalidInput("client", "the policy asked for a bundle but the loop has no client")
        outcome = self.agent.refresh(client, self.window)
        self._count(outcome)
        return Step(True, outcome)

    async def observe_async(self, item: int, client: AsyncParamClient) -> Step:
        if not self._decide(item):
            return Step(False)
        outcome = await self.agent.refresh_async(client, self.window)
        self._count(outcome)
        return Step(True, outcome)

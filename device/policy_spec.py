"""Policy specs: `NAME[:params]` parsed, written back and built into a policy (see device/policy.py).

    spec = parse_policy("drift:rate=0.1")      # PolicySpec("drift", {"rate": 0.1}, "drift:rate=0.1")
    policy = build_policy(spec.at_budget(0.2))  # a budget sets the rate of a spec that fixes none
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paramcast.common.errors import InvalidInput
from paramcast.device.ideal import GaussianMapper, IdealGate
from paramcast.device.policy import Always, DriftGate, EveryK, Gate, LossGate, Never, Policy, RandomP, WindowGate

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Never, Always, EveryK, RandomP, DriftGate, WindowGate, LossGate, IdealGate)
}
GATES = tuple(name for name, cls in POLICIES.items() if issubclass(cls, Gate))
# What `paramcast simulate` and `paramcast demo` compare unless told otherwise: the baselines and
# the gates each plain and paced (a paced gate asks only with requests in hand, so it spends its
# budget evenly over time); validation chooses among them.
DEFAULT_POLICIES = ("never", "always", "every-k", "random-p", "drift", "window", "loss", "ideal",
                    "drift:pace=1", "window:pace=1.5,burst=3", "ideal:pace=1.25")


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

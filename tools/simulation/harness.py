"""The simulation: calibrate policies on validation devices, replay them on test devices, report.

    report = simulate(ckpt, data, SimulationConfig(policies=["never", "always", "every-k",
                                                   "random-p", "drift", "loss", "ideal"], budgets=[0.1]))

Devices come from a pool of real users (by default the users the checkpoint held out of
training) split at random into validation and test devices. Everything that is tuned - gate
thresholds (calibrated to a request rate), the IDEAL mapper, which gate is "the best" - is
decided on validation devices; test devices are only replayed and measured.

A policy spec that fixes no rate (`every-k`, `random-p`, `drift`, ...) runs once per budget in
`budgets`: `every-k` with k = 1/budget, `random-p` with p = budget, a gate calibrated to request
on `budget` of the validation steps. `never` and `always` run once.

Each set of devices is cut into shards (shards.py) that an engine runs: in this process by
default, on Ray actors with `RayEngine` (ray_engine.py); the report does not depend on which.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.common.errors import InvalidInput
from paramcast.common.evaluation import bootstrap_ci, paired_difference, summarize
from paramcast.common.interactions import InteractionLog
from paramcast.device.ideal import GaussianMapper
from paramcast.device.policy import Gate, Policy, RandomP
from paramcast.device.policy_spec import DEFAULT_POLICIES, PolicySpec, build_policy, format_spec, parse_policy
from paramcast.simulation.calibration import calibrate_threshold, fit_gaussian_mapper
from paramcast.simulation.replay import METRICS, STARTS, Run
from paramcast.simulation.shards import DEFAULT_SHARD_DEVICES, Engine, LocalEngine, Network, ShardPlan, merge, plan
from paramcast.simulation.timelines import Timelines, build_timelines, split_devices

log = logging.getLogger(__name__)

DEVICE_SCORING = ("agents", "torch")  # network mode: device agents on ONNX Runtime, or batched torch scoring


@dataclass
class SimulationConfig:
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    budgets: list[float] = field(default_factory=lambda: [0.1])
    warmup: int = 3  # interactions before a device enrols
    n_negatives: int = 100
    devices: str = "cold"  # the user pool: "cold" (held out of training) or "all"
    valid_fraction: float = 0.5  # share of the pool used as validation devices
    users: int | None = None  # at most this many test devices (and as many validation devices)
    max_steps: int | None = None  # replay at most this many steps per device
    start: str = "bundle"  # after warm-up a device holds its enrolment bundle, or "base" (nothing)
    encoding: str = "int8"  # wire encoding of every bundle
    seed: int = 0
    shard_devices: int = DEFAULT_SHARD_DEVICES  # devices per shard (shards.py); results depend on it, not on engines
    progress: bool = True

    def check(self) -> None:
        if not self.policies:
            raise InvalidInput("policy", "name at least one policy")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise InvalidInput("budget", f"must be in (0, 1], got {b}")
        if self.start not in STARTS:
            raise InvalidInput("start", f"must be one of {STARTS}, got {self.start!r}")
        if self.users is not None and self.users < 1:
            raise InvalidInput("users", f"must be >= 1, got {self.users}")
        if self.shard_devices < 1:
            raise InvalidInput("shard_devices", f"must be >= 1, got {self.shard_devices}")


@dataclass
class Prepared:
    """One set of devices: its timelines, their shards (whose caches the engine holds), and the
    wire size of one bundle."""

    what: str  # "validation" or "test"
    tl: Timelines
    shards: ShardPlan
    bundle_bytes: int


@dataclass
class Entry:
    """One policy run on the test devices, with what calibration decided on validation."""

    spec: PolicySpec
    budget: float | None
    run: Run
    valid: dict = field(default_factory=dict)


class Simulation:
    """Holds the prepared validation and test devices; `run()` produces the report."""

    def __init__(self, ckpt: Checkpoint, data: InteractionLog, cfg: SimulationConfig, test_bundles: bool = True,
                 engine: Engine | None = None):
        """`test_bundles=False`: the test devices get their bundles from a server (`network`), none
        are cached. `engine`: where the shards run (default: this process)."""
        cfg.check()
        if data.n_items != ckpt.device_model.cfg.n_items:
            raise InvalidInput("data", f"has {data.n_items} items but model {ckpt.model_id} was trained on "
                                       f"{ckpt.device_model.cfg.n_items}; simulate on the data it was trained on")
        self.ckpt, self.data, self.cfg = ckpt, data, cfg
        self.specs = [parse_policy(p) for p in cfg.policies]
        if ckpt.generator is None and any(s.name != "never" for s in self.specs):
            raise InvalidInput("model", f"model {ckpt.model_id} has no generator; only `never` can run")
        self.engine: Engine = engine or LocalEngine(ckpt, cfg.encoding)
        self.network: Network | None = None  # network mode: the server test devices call
        self.item_emb = ckpt.device_model.item_emb.weight.detach().numpy().copy()
        self.timing: dict[str, float] = {}
        self.steps_replayed = 0
        self.replay_seconds = 0.0
        self.mapper: GaussianMapper | None = None
        self.valid_runs: dict[str, Run] = {}
        self._t0 = time.perf_counter()
        cold = ckpt.meta.get("split", {}).get("cold_users", [])
        valid_users, test_users = split_devices(data, cold, cfg.devices, cfg.valid_fraction, cfg.seed)
        if cfg.users is not None:
            valid_users, test_users = valid_users[: cfg.users], test_users[: cfg.users]
        self.valid = self._prepare(valid_users, "validation", seed=cfg.seed + 1)
        self.test = self._prepare(test_users, "test", seed=cfg.seed, bundles=test_bundles)
        if self.test.tl.n_steps == 0:
            raise InvalidInput("data", f"no test device has more than {cfg.warmup} interactions")

    def _prepare(self, users: np.ndarray, what: str, seed: int, bundles: bool = True) -> Prepared:
        t0 = time.perf_counter()
        tl = build_timelines(self.data, users, self.cfg.warmup, self.cfg.n_negatives, self.cfg.max_steps, seed)
        shards = plan(tl, self.cfg.shard_devices)
        log.info("%s devices: %d users, %d steps, %d shards", what, tl.n_devices, tl.n_steps, shards.n_shards)
        sizes = self.engine.prepare(what, shards, bundles)
        self.timing[f"prepare_{what}"] = time.perf_counter() - t0
        return Prepared(what, tl, shards, max(sizes, default=0))

    # -- replays --------------------------------------------------------------------------------
    def replay(self, policy: Policy, on: Prepared, name: str, network: bool = False,
               examples_at: list | None = None) -> Run:
        """Every shard of `on` replayed under `policy`, merged back into one Run. `network`: the
        test devices call `self.network`; `examples_at` (ShardPlan.local): also collect the IDEAL
        mapper's examples, in run.extra["examples"]."""
        t0 = time.perf_counter()
        local = [steps for steps, _ in examples_at] if examples_at is not None else None
        pieces = self.engine.replay(on.what, policy, self.cfg.start, self.cfg.seed, name,
                                    self.network if network else None, local)
        run = merge(on.shards, pieces, name, policy.describe(), time.perf_counter() - t0)
        if examples_at is not None:
            run.extra["examples"] = [(piece.examples, where) for piece, (_, where) in zip(pieces, examples_at,
                                                                                           strict=True)]
        self.steps_replayed += on.tl.n_steps
        self.replay_seconds += run.seconds
        return run

    def fit_mapper(self, rate: float) -> GaussianMapper:
        """Fit the IDEAL distribution mapper on validation devices replayed under random-p at `rate`:
        what each step's fresh bundle would change in the user state, given how stale the held one is."""
        on = self.valid
        rng = np.random.default_rng(self.cfg.seed)
        steps = np.arange(on.tl.n_steps)
        if len(steps) > 50_000:  # plenty for a closed-form fit of a (2d + 1) x d map
            steps = np.sort(rng.choice(steps, 50_000, replace=False))
        run = self.replay(RandomP(rate), on, f"mapper examples (random-p:{rate:g})", False, on.shards.local(steps))
        d = self.item_emb.shape[1]
        b, ref, delta = (np.empty((len(steps), d), np.float32) for _ in range(3))
        for (b_s, ref_s, delta_s), where in run.extra["examples"]:  # each shard's examples, back in step order
            b[where], ref[where], delta[where] = b_s, ref_s, delta_s
        mapper = fit_gaussian_mapper(b, ref, delta)
        mapper.meta["fitted_on"] = f"validation devices under random-p:{rate:g}"
        log.info("ideal mapper: %d examples, mean R^2 %.3f", mapper.meta["examples"], mapper.meta["r2_mean"])
        return mapper

    def build(self, spec: PolicySpec) -> Policy:
        if spec.name == "ideal" and self.mapper is None:
            self.mapper = self.fit_mapper(min(self.cfg.budgets))
        window = self.ckpt.generator.cfg.window if self.ckpt.generator is not None else None
        return build_policy(spec, self.mapper, self.item_emb, window)

    def calibrate(self, spec: PolicySpec) -> tuple[Policy, dict]:
        """Build a policy; a gate given a rate gets its threshold from replays on validation devices."""
        policy = self.build(spec)
        if not isinstance(policy, Gate) or policy.threshold is not None:
            return policy, {}
        t0 = time.perf_counter()
        target = float(policy.target_rate)  # type: ignore[arg-type]
        # Bracket the search with the scores a gate sees when it never requests (staleness keeps
        # growing) and when it always does (scores right after a fresh bundle).
        hints = []
        for bound in (float("inf"), -float("inf")):
            policy.threshold = bound
            hints.append(self.replay(policy, self.valid, f"{spec.text} (calibration)").gate)
        hint = np.concatenate(hints)

        def rate_at(threshold: float) -> float:
            policy.threshold = threshold
            return self.replay(policy, self.valid, f"{spec.text} (calibration)").request_rate

        threshold, reached = calibrate_threshold(rate_at, target, hint)
        policy.threshold = threshold
        valid_run = self.replay(policy, self.valid, spec.text)
        self.valid_runs[spec.text] = valid_run
        info = {"threshold": threshold, "target_rate": target, "request_rate": valid_run.request_rate,
                "ndcg@10": float(valid_run.per_device(self.valid.tl)["ndcg@10"].mean()),
                "seconds": time.perf_counter() - t0}
        log.info("calibrated %s: threshold %.5g -> validation rate %.4f (target %.4f)", spec.text, threshold,
                 valid_run.request_rate, target)
        return policy, info

    def entries(self) -> list[Entry]:
        """Every (spec, budget) run on the test devices."""
        out = []
        todo = [(spec, budget) for spec in self.specs
                for budget in (list(self.cfg.budgets) if spec.rate_free else [None])]
        bar = tqdm(todo, desc="policies", unit="policy", disable=not self.cfg.progress)
        for spec, budget in bar:
            s = spec.at_budget(budget) if budget is not None else spec
            bar.set_postfix_str(s.text)
            policy, valid = self.calibrate(s)
            run = self.replay(policy, self.test, s.text, self.network is not None)  # network: what crossed the wire
            out.append(Entry(s, budget if budget is not None else _spec_rate(s), run, valid))
            log.info("%-28s rate %.4f ndcg@10 %.4f (%.1fs)", s.text, run.request_rate,
                     run.per_device(self.test.tl)["ndcg@10"].mean(), run.seconds)
        return out

    def run(self) -> dict:
        entries = self.entries()
        self.timing["total"] = time.perf_counter() - self._t0
        return build_report(self, entries)


def _spec_rate(spec: PolicySpec) -> float | None:
    """The nominal request rate a spec fixes (None for never/always or a fixed threshold)."""
    p = spec.params
    if "rate" in p:
        return float(p["rate"])
    if "p" in p:
        return float(p["p"])
    if "k" in p:
        return 1.0 / int(p["k"])
    return None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """mean(num) / mean(den) with a percentile bootstrap CI resampling devices (paired rows)."""
    value = float(num.mean() / den.mean()) if den.mean() != 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = num[idx].mean(1) / den[idx].mean(1)
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return value, [float("nan"), float("nan")]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return value, [float(lo), float(hi)]


def _over_time(run: Run, tl: Timelines, metric: str = "ndcg@10") -> dict:
    """Mean metric per step number, in bins that widen with the step (few devices replay long)."""
    j = tl.step_index()
    edges = np.unique(np.concatenate([np.arange(0, 10), np.round(np.geomspace(10, max(11, tl.max_length + 1),
                                                                              25)).astype(int)]))
    which = np.clip(np.searchsorted(edges, j, side="right") - 1, 0, len(edges) - 1)
    sums = np.bincount(which, weights=run.metrics[metric], minlength=len(edges))
    counts = np.bincount(which, minlength=len(edges))
    rates = np.bincount(which, weights=run.requested.astype(np.float64), minlength=len(edges))
    keep = counts > 0
    return {"step": edges[keep].tolist(), metric: (sums[keep] / counts[keep]).tolist(),
            "request_rate": (rates[keep] / counts[keep]).tolist(), "steps": counts[keep].tolist()}


def build_report(sim: Simulation, entries: list[Entry]) -> dict:
    tl = sim.test.tl
    per_device = {e.spec.text: e.run.per_device(tl) for e in entries}
    bundle_bytes = sim.valid.bundle_bytes or sim.test.bundle_bytes
    enrol = 1 if sim.cfg.start == "bundle" else 0
    never = next((e for e in entries if e.spec.name == "never"), None)
    always = next((e for e in entries if e.spec.name == "always"), None)
    gain = None
    if never and always:
        gain = per_device[always.spec.text]["ndcg@10"] - per_device[never.spec.text]["ndcg@10"]

    policies = []
    for e in entries:
        pd = per_device[e.spec.text]
        summary = summarize({m: pd[m] for m in METRICS}, seed=sim.cfg.seed)
        requests = np.add.reduceat(e.run.received.astype(np.float64), tl.start)  # (D,) bundles received
        row = {
            "name": e.spec.text,
            "policy": e.spec.name,
            "family": format_spec(e.spec.name, {k: v for k, v in e.spec.params.items()
                                                if k not in ("rate", "k", "p", "threshold")}),
            "budget": e.budget,
            "request_rate": e.run.request_rate,
            "request_rate_ci": list(bootstrap_ci(pd["requests"], seed=sim.cfg.seed)),
            "requests_per_device": float(requests.mean()),
            "bytes_per_device": float(e.run.extra["bytes_per_device"].mean()) if "bytes_per_device" in e.run.extra
            else float((requests + enrol).mean() * bundle_bytes),
            **{m: {"value": summary[m]["value"], "ci": summary[m]["ci"]} for m in METRICS},
            "policy_config": e.run.policy,
            "seconds": e.run.seconds,
        }
        if never is not None:
            diff = paired_difference({m: pd[m] for m in METRICS},
                                     {m: per_device[never.spec.text][m] for m in METRICS}, seed=sim.cfg.seed)
            row["vs_never"] = {m: {"value": diff[m]["value"], "ci": diff[m]["ci"]} for m in METRICS}
        if gain is not None and never is not None:
            value, ci = ratio_ci(pd["ndcg@10"] - per_device[never.spec.text]["ndcg@10"], gain, seed=sim.cfg.seed)
            row["gain_kept"] = {"value": value, "ci": ci}
        if e.valid:
            row["validation"] = e.valid
        if "network" in e.run.extra:
            row["network"] = e.run.extra["network"]
        policies.append(row)

    paired = []

    def pair(a: Entry, b: Entry, why: str) -> None:
        diff = paired_difference({m: per_device[a.spec.text][m] for m in METRICS},
                                 {m: per_device[b.spec.text][m] for m in METRICS}, seed=sim.cfg.seed)
        paired.append({"a": a.spec.text, "b": b.spec.text, "why": why,
                       **{m: {"value": diff[m]["value"], "ci": diff[m]["ci"]} for m in METRICS}})

    if never and always:
        pair(always, never, "value of fresh bundles")
    for e in entries:
        if e.spec.is_gate and e.budget is not None:
            for other in entries:
                if other.spec.name in ("random-p", "every-k") and other.budget == e.budget:
                    pair(e, other, f"gate vs baseline at budget {e.budget:g}")
    if always:
        # `always` holds the freshest bundle any policy can hold, so (as long as a fresher bundle is
        # no worse) what it gains over a baseline bounds what a gate at that baseline's budget can
        # gain over it: when this interval includes zero, no gate at that budget is likely to be
        # shown to beat the baseline on these devices.
        for other in entries:
            if other.spec.name in ("random-p", "every-k") and other.budget is not None:
                pair(always, other, f"headroom over baseline at budget {other.budget:g}")

    selected = select_gates(sim, entries)
    bars = verdict_at_budget(policies, paired, selected)
    total = sim.timing.get("total", float("nan"))
    return {
        "dataset": sim.data.name,
        "model": {"model_id": sim.ckpt.model_id, "base_version": sim.ckpt.base_version},
        "mode": "network" if any("network" in e.run.extra for e in entries) else "inprocess",
        "config": asdict(sim.cfg),
        "devices": {"test": tl.n_devices, "test_steps": tl.n_steps, "validation": sim.valid.tl.n_devices,
                    "validation_steps": sim.valid.tl.n_steps, "pool": sim.cfg.devices,
                    "shards": {"test": sim.test.shards.n_shards, "validation": sim.valid.shards.n_shards}},
        "bundle_bytes": bundle_bytes,
        "policies": policies,
        "paired": paired,
        "selected_gates": selected,
        "bars": bars,
        "device_steps_per_s": sim.steps_replayed / total if total else float("nan"),
        "throughput": {
            "device_steps": sim.steps_replayed,
            "seconds_total": total,
            "replay_device_steps_per_s": sim.steps_replayed / sim.replay_seconds if sim.replay_seconds else None,
            "seconds": {**sim.timing, "replay": sim.replay_seconds},
            "torch_threads": torch.get_num_threads(),
            "engine": {"name": getattr(sim.engine, "name", type(sim.engine).__name__), "workers": sim.engine.workers},
        },
        "ideal_mapper": sim.mapper.meta if sim.mapper else None,
        "over_time": {e.spec.text: _over_time(e.run, tl) for e in entries},
    }


def select_gates(sim: Simulation, entries: list[Entry]) -> list[dict]:
    """Per budget, the gate with the best validation NDCG@10: the choice made without test devices."""
    out = []
    for budget in sorted({e.budget for e in entries if e.spec.is_gate and e.budget is not None}):
        gates = [e for e in entries if e.spec.is_gate and e.budget == budget and e.valid]
        if gates:
            best = max(gates, key=lambda e: e.valid["ndcg@10"])
            out.append({"budget": budget, "name": best.spec.text, "by": "validation ndcg@10",
                        "validation": {e.spec.text: e.valid["ndcg@10"] for e in gates}})
    return out


VERDICT_BUDGET = 0.1  # the request budget the report's verdict (`bars`) is given at


def verdict_at_budget(policies: list[dict], paired: list[dict], selected: list[dict],
                      budget: float = VERDICT_BUDGET) -> dict:
    """How the gate selected on validation devices at `budget` does on the test devices: whether
    it keeps 90% of the NDCG@10 that always-requesting gains over never-requesting (a share that
    only means something when that gain is significant), and whether it beats random-p and every-k
    at the same budget, each as a paired difference with its CI, beside the headroom there was to
    beat each by (always - that baseline). The report's `bars`."""
    pick = next((s for s in selected if abs(s["budget"] - budget) < 1e-9), None)
    if pick is None:
        return {"budget": budget, "evaluated": False, "why": f"no gate ran at a {budget:g} budget"}
    row = next(p for p in policies if p["name"] == pick["name"])
    out: dict = {"budget": budget, "evaluated": True, "gate": pick["name"], "request_rate": row["request_rate"]}
    fresh = next((p for p in paired if p["a"] == "always" and p["b"] == "never"), None)
    if fresh is not None:
        # A share of a gain only means something when there is a gain: always must beat never.
        out["always_minus_never"] = fresh["ndcg@10"]
        out["gain_significant"] = fresh["ndcg@10"]["ci"][0] > 0
    if "gain_kept" in row:
        out["gain_kept"] = row["gain_kept"]
        out["keeps_90_percent"] = row["gain_kept"]["value"] >= 0.9 and bool(out.get("gain_significant"))
    for baseline in ("random-p", "every-k"):
        d = next((p for p in paired if p["a"] == pick["name"] and p["b"].startswith(baseline)), None)
        if d is not None:
            out[f"beats_{baseline}"] = {"ndcg@10": d["ndcg@10"], "ci_above_zero": d["ndcg@10"]["ci"][0] > 0}
            room = next((p for p in paired if p["a"] == "always" and p["b"] == d["b"]), None)
            if room is not None:
                out[f"headroom_over_{baseline}"] = {"ndcg@10": room["ndcg@10"],
                                                    "ci_above_zero": room["ndcg@10"]["ci"][0] > 0}
    return out


def simulate(ckpt: Checkpoint, data: InteractionLog, cfg: SimulationConfig, engine: Engine | None = None) -> dict:
    """Run a full simulation (see module docstring) and return the report dictionary."""
    return run_simulation(ckpt, data, cfg, engine=engine).report


@dataclass
class SimulationResult:
    report: dict
    mapper: GaussianMapper | None  # the IDEAL gate's mapper fitted on validation devices, when it ran


def run_simulation(ckpt: Checkpoint, data: InteractionLog, cfg: SimulationConfig, mode: str = "inprocess",
                   server: str | None = None, model_dir: str | None = None, serve_threads: int = 1,
                   device_scoring: str = "agents", engine: Engine | None = None) -> SimulationResult:
    """`simulate` in either mode, on `engine` (default: this process), which is closed at the end.
    Network mode replays the test devices as gRPC clients of `server`, or of a `paramcast serve
    --model model_dir` started on loopback for the run (calibration on validation devices stays
    offline: it is tuning, not device traffic); with `device_scoring="agents"` every test device
    is a device agent scoring on ONNX Runtime, with "torch" the devices' scoring stays batched in
    torch. The result holds the report and the fitted IDEAL mapper, if that gate ran."""
    if mode not in ("inprocess", "network"):
        raise InvalidInput("mode", f"must be 'inprocess' or 'network', got {mode!r}")
    if device_scoring not in DEVICE_SCORING:
        raise InvalidInput("device_scoring", f"must be one of {DEVICE_SCORING}, got {device_scoring!r}")
    if mode == "network" and ckpt.generator is None:
        raise InvalidInput("model", "network mode needs a model with a generator")
    if mode == "network" and server is None and model_dir is None:
        raise InvalidInput("server", "network mode needs a server address or a model directory to serve")
    try:
        sim = Simulation(ckpt, data, cfg, test_bundles=mode == "inprocess", engine=engine)
    except BaseException:
        if engine is not None:
            engine.close()
        raise
    proc = None
    try:
        with tempfile.TemporaryDirectory(prefix="paramcast-sim-") as tmp:
            if mode == "network":
                from paramcast.serve_process import ServeProcess

                if server is None:
                    t0 = time.perf_counter()
                    # A fleet's burst must queue, not be refused: a deep queue and generator batches of up to 256.
                    proc = ServeProcess(["--model", str(model_dir), "--threads", str(serve_threads), "--max-batch",
                                         "256", "--max-delay-ms", "2.0", "--max-queue", "100000"])
                    server = proc.target
                    log.info("started paramcast serve on %s (%.1fs)", server, time.perf_counter() - t0)
                package = device_package(ckpt, model_dir, f"{tmp}/package") if device_scoring == "agents" else None
                sim.network = Network(server, ckpt.model_id, ckpt.base_version, cfg.encoding, scoring=device_scoring,
                                      package_dir=str(package.path) if package is not None else None)
            try:
                report = sim.run()
            finally:
                sim.engine.close()  # the devices' clients and agents, before their folders go
    finally:
        if proc is not None:
            proc.stop()
    if mode == "network":
        test_steps = sim.test.tl.n_steps * len(report["policies"])
        test_seconds = sum(p["seconds"] for p in report["policies"])
        report["network"] = {"server": server, "started_server": proc is not None, "device_scoring": device_scoring,
                             "devices": sim.test.tl.n_devices, "clients": sim.test.tl.n_devices,
                             "device_steps": test_steps,
                             "device_steps_per_s": test_steps / test_seconds if test_seconds else None}
    return SimulationResult(report, sim.mapper)


def device_package(ckpt: Checkpoint, model_dir: str | None, out: str):
    """The device package the agents run: `model_dir/package` when it is this checkpoint's, else exported."""
    from paramcast.cloud.export import export_package
    from paramcast.common.package import DevicePackage

    if model_dir is not None and (Path(model_dir) / "package" / "manifest.json").is_file():
        package = DevicePackage.load(Path(model_dir) / "package")
        if package.model_id == ckpt.model_id and package.base_version == ckpt.base_version:
            return package
    return DevicePackage.load(export_package(ckpt, out))

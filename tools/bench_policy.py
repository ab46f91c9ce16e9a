"""What a request policy costs on the device, against one ONNX Runtime scoring call.

    python tools/bench_policy.py --model runs/ml-100k --data ../shared/data/ml-100k --out benchmarks/results

For one device (a fleet of one, as on a phone): the time of `DeviceRuntime.score` for one user
and 101 candidates with a bundle applied, the extra time of also fetching the `behaviour` and
`user_state` outputs from that same run (what the gates read), and the time of each policy's
decision from those outputs. The bar: a gate costs under 10% of one scoring call. Batched per-device
costs (a fleet of 1,000 deciding at once, as the simulation does) are reported beside them.
Writes policy-cost-<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from paramcast.device.ideal import GaussianMapper, item_embeddings
from paramcast.device.policy import Gate, Policy, StepView
from paramcast.device.policy_spec import build_policy, parse_policy
from paramcast.simulation.calibration import fit_gaussian_mapper

POLICIES = ("never", "always", "every-k:10", "random-p:0.1", "drift:threshold=0.3", "window:threshold=0.3",
            "loss:threshold=0.5", "ideal:threshold=0.1", "drift:rate=0.1,pace=1.5")


def timed(fn, repeats: int) -> np.ndarray:
    """Per-call seconds of `fn(i)` for i in range(repeats), after a short warm-up."""
    for i in range(min(20, repeats)):
        fn(i)
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        out[i] = time.perf_counter() - t0
    return out


def stats_us(seconds: np.ndarray) -> dict:
    us = seconds * 1e6
    return {"p50": float(np.percentile(us, 50)), "p99": float(np.percentile(us, 99)), "mean": float(us.mean())}


def make_policy(text: str, mapper: GaussianMapper, emb: np.ndarray, n: int, d: int) -> Policy:
    policy = build_policy(parse_policy(text), mapper, emb)
    if isinstance(policy, Gate) and policy.threshold is None:
        policy.threshold = 0.1  # as calibration would set it; the cost does not depend on the value
    policy.start(n, 0, np.random.default_rng(1).normal(size=(n, d)).astype(np.float32), np.full(n, 5))
    return policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--data", required=True, help="its dataset (real histories and candidates)")
    ap.add_argument("--package", default=None, help="device package (default: MODEL/package, else exported)")
    ap.add_argument("--mapper", default=None, help="ideal gate mapper .npz (cost does not depend on its values)")
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--out", default=None, help="write policy-cost-<dataset>.json into this folder")
    args = ap.parse_args(argv)

    import torch

    from paramcast.cloud.bundles import generate_bundles
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.export import export_package
    from paramcast.common.data import load_interactions
    from paramcast.common.package import DevicePackage
    from paramcast.device.runtime import DeviceRuntime

    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.model)
    data = load_interactions(args.data)
    pkg_dir = Path(args.package) if args.package else Path(args.model) / "package"
    if not (pkg_dir / "manifest.json").is_file():
        pkg_dir = export_package(ckpt, Path(tempfile.mkdtemp(prefix="bench-policy-")) / "package")
    package = DevicePackage.load(pkg_dir)
    runtime = DeviceRuntime(package, threads=1)

    rng = np.random.default_rng(0)
    users = rng.choice(np.flatnonzero(data.lengths() >= 10), size=200, replace=True)
    histories = [data.sequences[u][: len(data.sequences[u]) - 1] for u in users]
    candidates = rng.integers(1, data.n_items + 1, size=(len(users), 101))
    runtime.apply(generate_bundles(ckpt, [histories[0]])[0].quantized("int8"))

    # One scoring call, as a device makes it for each recommendation.
    n_h = len(histories)
    score = timed(lambda i: runtime.score(histories[i % n_h], candidates[i % n_h]), args.repeats)

    # The gates read `behaviour` and `user_state`; fetched from the same run they cost almost nothing.
    L = package.max_len
    padded = np.zeros((n_h, L), np.int64)
    for i, h in enumerate(histories):
        padded[i, L - len(h[-L:]):] = h[-L:]
    factors = generate_bundles(ckpt, [histories[0]])[0].quantized("int8").factors
    feeds_extra = {}
    for slot in package.slots.values():
        a, b = factors[slot.name]
        feeds_extra[slot.a_input], feeds_extra[slot.b_input] = a[None], b[None]
    session = runtime.active_session

    def run_outputs(names):
        return lambda i: session.run(names, {"history": padded[i % n_h: i % n_h + 1],
                                             "candidates": candidates[i % n_h: i % n_h + 1], **feeds_extra})

    one_output = timed(run_outputs(["scores"]), args.repeats)
    three_outputs = timed(run_outputs(["scores", "user_state", "behaviour"]), args.repeats)
    outs = [session.run(["scores", "user_state", "behaviour"],
                        {"history": padded[i: i + 1], "candidates": candidates[i: i + 1], **feeds_extra})
            for i in range(n_h)]

    emb = item_embeddings(package)
    d = package.hidden
    if args.mapper:
        mapper = GaussianMapper.load(args.mapper)
    else:  # any fitted mapper of the right shape costs the same to apply
        x = rng.normal(size=(512, d)).astype(np.float32)
        mapper = fit_gaussian_mapper(x, x + rng.normal(size=x.shape).astype(np.float32), rng.normal(size=x.shape))
    views = [StepView.single(o[2][0], o[1][0], o[0][0], candidates[i], observed=int(rng.integers(0, 101)),
                             seen=len(histories[i]))
             for i, o in enumerate(outs)]

    report: dict = {
        "dataset": data.name, "model": ckpt.model_id, "package": str(pkg_dir),
        "hidden": d, "max_len": L, "candidates": 101,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "scoring_call_us": stats_us(score),
        "session_run_us": {"scores_only": stats_us(one_output), "scores_user_state_behaviour": stats_us(three_outputs)},
        "policies": {},
    }
    base = report["scoring_call_us"]["p50"]
    for text in POLICIES:
        policy = make_policy(text, mapper, emb, 1, d)
        cost = timed(lambda i, p=policy: p.decide(views[i % n_h]), args.repeats)
        # A fleet deciding together (the simulation's shape): per-device cost.
        fleet = 1000
        big = make_policy(text, mapper, emb, fleet, d)
        rows = rng.integers(0, n_h, size=fleet)
        batch = StepView(np.arange(fleet), np.concatenate([views[r].behaviour for r in rows]),
                         np.concatenate([views[r].user_state for r in rows]),
                         np.concatenate([views[r].scores for r in rows]),
                         np.concatenate([views[r].candidates for r in rows]),
                         np.concatenate([views[r].observed for r in rows]),
                         np.concatenate([views[r].seen for r in rows]))
        batched = timed(lambda i, p=big, v=batch: p.decide(v), 50) / fleet
        s = stats_us(cost)
        gate = isinstance(policy, Gate)
        report["policies"][text] = {
            "decision_us": s, "fraction_of_scoring_call": s["p50"] / base,
            **({"gate_cost_vs_score": s["p50"] / base} if gate else {}),
            "batched_per_device_us": stats_us(batched)["p50"],
        }
    gates = {k: v for k, v in report["policies"].items() if "gate_cost_vs_score" in v}
    report["bar"] = {"gate_under_10_percent_of_scoring": all(v["gate_cost_vs_score"] <= 0.10
                                                              for v in gates.values()),
                     "worst_gate": max(gates, key=lambda k: gates[k]["gate_cost_vs_score"])}
    report["command"] = "python tools/bench_policy.py " + " ".join(argv if argv is not None else sys.argv[1:])

    print(f"scoring call (1 user, 101 candidates, bundle applied): p50 {base:.1f} us")
    print(f"session run, scores only {report['session_run_us']['scores_only']['p50']:.1f} us; "
          f"+ user_state + behaviour {report['session_run_us']['scores_user_state_behaviour']['p50']:.1f} us")
    for name, v in report["policies"].items():
        print(f"  {name:24s} {v['decision_us']['p50']:7.1f} us  {v['fraction_of_scoring_call']:6.1%} of a scoring call"
              f"  ({v['batched_per_device_us']:.2f} us/device batched)")
    if args.out:
        path = Path(args.out) / f"policy-cost-{data.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`paramcast demo`: the whole loop on MovieLens 100K, end to end, in a few minutes.

    paramcast demo [--data PATH] [--out paramcast-demo]

1. finds ml-100k: `--data`, else `$PARAMCAST_DATA`, else `../shared/data`, else downloads it from
   GroupLens (md5 checked);
2. trains the device model and its generator with `paramcast train`'s defaults (40% of the users
   are held out of training and become the devices);
3. exports the ONNX device package;
4. starts `paramcast serve` on loopback;
5. replays every held-out user as a device - each one a gRPC client - under never, always,
   every-k, random-p and the drift, window, loss and IDEAL-style gates at a 10% request budget
   (gate thresholds calibrated on validation devices), each device's first 50 steps;
6. prints the policy table and where the JSON report and plots are.

A second run reuses the trained model in OUT/model (`--retrain` trains again).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

DATASET = "ml-100k"
COLD_FRACTION = 0.4  # users held out of training; a third calibrate the gates, the rest are the test devices


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train, export, serve and simulate devices on ml-100k, end to end",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--data", metavar="PATH", default=None,
                   help="ml-100k folder, or a folder holding ml-100k/ (default: $PARAMCAST_DATA, ../shared/data, "
                        "else download)")
    p.add_argument("--out", metavar="DIR", default="paramcast-demo", help="where the model and results go")
    p.add_argument("--retrain", action="store_true", help="train again even if OUT/model exists")
    p.add_argument("--budget", nargs="+", type=float, default=[0.1], metavar="RATE",
                   help="request budgets to compare the policies at (default 0.1)")
    p.add_argument("--max-steps", type=int, default=50, help="steps replayed per device (default 50)")
    p.add_argument("--users", type=int, default=None, metavar="N", help="at most N devices (default: all held out)")
    p.add_argument("--epochs", type=int, default=200, help="static-stage epoch cap (early stopping decides)")
    p.add_argument("--gen-epochs", type=int, default=30, help="generator-stage epoch cap")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def train_command(argv: list[str]) -> None:
    """Run `paramcast train` in this process with its own defaults: the demo's model is what the
    documented command trains."""
    from paramcast.commands import train

    parser = argparse.ArgumentParser(prog="paramcast")
    train.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *argv])
    args.func(args)


def find_data(explicit: str | None, fetch_to: Path) -> Path:
    """The ml-100k folder: explicit path, $PARAMCAST_DATA, ../shared/data (from here or from the
    source tree), else a verified download into `fetch_to`."""
    candidates = [explicit] if explicit else []
    if not explicit:
        if os.environ.get("PARAMCAST_DATA"):
            candidates.append(os.environ["PARAMCAST_DATA"])
        root = Path(__file__).resolve().parents[2]
        candidates += [str(Path.cwd() / ".." / "shared" / "data"), str(root / ".." / "shared" / "data")]
    for c in candidates:
        path = Path(c)
        for folder in (path, path / DATASET):
            if (folder / "u.data").is_file():
                return folder.resolve()
    if explicit:
        from paramcast.common.errors import InvalidInput

        raise InvalidInput("data", f"{explicit} holds no {DATASET} (looked for u.data in it and in {DATASET}/)")
    from paramcast.common.fetch import fetch

    print(f"{DATASET} not found locally; downloading it into {fetch_to}", flush=True)
    return fetch(DATASET, fetch_to)


def run(args: argparse.Namespace) -> int:
    import torch

    from paramcast.cloud.checkpoint import checkpoint_file, load_checkpoint
    from paramcast.cloud.export import export_package
    from paramcast.common.data import load_interactions
    from paramcast.device.policy_spec import DEFAULT_POLICIES
    from paramcast.simulation.harness import SimulationConfig, run_simulation
    from paramcast.simulation.report import headline, plot, table, write_json

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = find_data(args.data, out / "data")
    data = load_interactions(data_dir)
    model_dir = out / "model"
    progress = not args.no_progress

    if args.retrain or not checkpoint_file(model_dir).is_file():
        print(f"[1/3] `paramcast train` on {data.name} ({data.n_users} users, {data.n_interactions:,} interactions); "
              f"{COLD_FRACTION:.0%} of the users are held out to become the simulated devices", flush=True)
        train_command(["--data", str(data_dir), "--out", str(model_dir), "--cold-fraction", str(COLD_FRACTION),
                       "--epochs", str(args.epochs), "--gen-epochs", str(args.gen_epochs),
                       "--threads", str(args.threads)] + ([] if progress else ["--no-progress"]))
        ckpt = load_checkpoint(model_dir)
        export_package(ckpt, model_dir / "package")
    else:
        print(f"[1/3] reusing the model in {model_dir} (--retrain to train again)", flush=True)
        ckpt = load_checkpoint(model_dir)
    print(f"      model {ckpt.model_id} {ckpt.base_version} ({time.perf_counter() - t0:.0f}s so far)", flush=True)

    print("[2/3] starting `paramcast serve` on loopback and replaying the held-out users as gRPC devices",
          flush=True)
    cfg = SimulationConfig(policies=list(DEFAULT_POLICIES), budgets=args.budget, valid_fraction=1 / 3,
                           max_steps=args.max_steps, users=args.users, progress=progress)
    report = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(model_dir),
                            serve_threads=max(1, args.threads or 1)).report

    print("[3/3] results", flush=True)
    results = out / "results"
    path = write_json(report, results / f"simulation-{data.name}-network.json")
    files = plot(report, results, "-network")
    print()
    print(table(report))
    net = [p["network"] for p in report["policies"] if "network" in p]
    busiest = max(net, key=lambda n: n["max_concurrent_calls"]) if net else None
    if busiest:
        print(f"network: {report['devices']['test']} devices, each its own gRPC client; up to "
              f"{busiest['max_concurrent_calls']} concurrent Generate calls, {busiest['bundles_per_s']:.0f} bundles/s, "
              f"p50 {busiest['latency_ms']['p50']:.1f} ms / p99 {busiest['latency_ms']['p99']:.1f} ms")
    print(f"report: {path}")
    for f in files:
        print(f"plot:   {f}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print()
    for line in headline(report):
        print(line)
    return 0

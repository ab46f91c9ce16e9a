"""`paramcast simulate`: replay real users as devices under request policies and report quality vs requests.

    paramcast simulate --model runs/ml-100k --data ../shared/data/ml-100k \\
        --policy never always every-k random-p drift loss ideal --budget 0.05 0.1 0.2 --out benchmarks/results

One device per real user (by default the users the model held out of training), replayed in time
order after a warm-up prefix: each step the device ranks the true next item among 100 sampled
negatives with the parameters it holds, observes the item, and its policy may request a bundle
generated from the window up to now. Gate thresholds are calibrated on validation devices only.
`--mode network` makes every test device a device agent - ONNX Runtime on the exported package,
its own bundle store and gRPC client, many on one event loop - that requests from `paramcast serve`
(started on loopback unless `--server` names one). Prints the policy table (or the JSON with
`--json`); `--out DIR` writes simulation-<dataset>.json and the plots there.

`--engine ray --workers N` runs the device shards (`--shard-devices` devices each) on N Ray
actors, on a local cluster or the one `--ray-address` names; for a seed and shard size the
report is the in-process one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from paramcast.device.policy_spec import DEFAULT_POLICIES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="replay real users as devices under request policies",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint (from `paramcast train`)")
    p.add_argument("--data", required=True, metavar="PATH", help="the dataset the model was trained on")
    p.add_argument("--format", default=None, help="dataset format (default: detected)")
    p.add_argument("--policy", nargs="+", metavar="NAME[:params]", default=None,
                   help="policies to replay, e.g. never always every-k:10 random-p:0.1 drift:rate=0.1 "
                        f"(default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--budget", nargs="+", type=float, default=[0.1], metavar="RATE",
                   help="request budgets (requests per device-step) for policies whose rate is not given: "
                        "every-k gets k = 1/RATE, random-p p = RATE, gates are calibrated to RATE (default 0.1)")
    p.add_argument("--mode", choices=("inprocess", "network"), default="inprocess",
                   help="inprocess: bundles from the generator in this process; network: every device a gRPC client")
    p.add_argument("--server", metavar="HOST:PORT", default=None,
                   help="network mode: use this running server instead of starting `paramcast serve` on loopback")
    p.add_argument("--device-scoring", choices=("agents", "torch"), default="agents",
                   help="network mode: every test device a device agent on ONNX Runtime (default), or the "
                        "devices' scoring batched in torch with only the requests on the wire")
    p.add_argument("--users", type=int, default=None, metavar="N", help="at most N test (and N validation) devices")
    p.add_argument("--devices", choices=("cold", "all"), default="cold",
                   help="user pool: cold = users held out of training (default), all = every user (in-sample)")
    p.add_argument("--valid-fraction", type=float, default=0.5, help="share of the pool used for calibration")
    p.add_argument("--warmup", type=int, default=3, help="interactions before a device enrols (default 3)")
    p.add_argument("--max-steps", type=int, default=None, help="replay at most this many steps per device")
    p.add_argument("--start", choices=("bundle", "base"), default="bundle",
                   help="after warm-up a device holds a bundle from its warm-up window (default) or nothing")
    p.add_argument("--encoding", choices=("int8", "fp16", "fp32"), default="int8", help="bundle wire encoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default; with --engine ray, per worker, default 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: every shard in this process (default); ray: shards on Ray actors")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="--engine ray: actors (default 2)")
    p.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="--engine ray: join this cluster (auto, HOST:PORT, ray://HOST:10001); default: a local one")
    p.add_argument("--shard-devices", type=int, default=None, metavar="N",
                   help="devices per shard, the unit engines spread (default 2048; part of the result's config)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--out", metavar="DIR", default=None, help="write simulation-<dataset>.json and PNG plots here")
    p.add_argument("--suffix", default="", help="appended to the output file names (e.g. -all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--package-out", metavar="PKG", default=None,
                   help="write a device package shipping one replayed policy, its threshold as calibrated here "
                        "(and the IDEAL mapper it used): what `paramcast device run --package PKG` runs")
    p.add_argument("--ship", metavar="NAME", default=None,
                   help="with --package-out: the policy to ship, by its name in the table (default: the only one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.common.data import load_interactions
    from paramcast.simulation.harness import SimulationConfig, run_simulation
    from paramcast.simulation.report import plot, table, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    data = load_interactions(args.data, args.format)
    cfg = SimulationConfig(
        policies=args.policy or list(DEFAULT_POLICIES), budgets=args.budget, warmup=args.warmup,
        devices=args.devices, valid_fraction=args.valid_fraction, users=args.users, max_steps=args.max_steps,
        start=args.start, encoding=args.encoding, seed=args.seed, progress=not args.no_progress,
        **({"shard_devices": args.shard_devices} if args.shard_devices else {}),
    )
    engine = None
    if args.engine == "ray":
        from paramcast.cloud import ray_cluster
        from paramcast.simulation.ray_engine import RayEngine

        ray_cluster.connect(args.ray_address, num_cpus=None if args.ray_address else args.workers)
        engine = RayEngine(ckpt, args.workers, cfg.encoding, threads=args.threads or 1)
    try:
        result = run_simulation(ckpt, data, cfg, mode=args.mode, server=args.server, model_dir=args.model,
                                device_scoring=args.device_scoring, engine=engine)
    finally:
        if engine is not None:
            ray_cluster.disconnect()
    report = result.report
    report["command"] = "paramcast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.out:
        suffix = ("-network" if args.mode == "network" else "") + args.suffix
        path = write_json(report, f"{args.out}/simulation-{data.name}{suffix}.json")
        report["files"] = [str(path)] + [str(f) for f in plot(report, args.out, suffix)]
        if result.mapper is not None:  # the IDEAL gate's fitted mapper, for devices that run the gate
            report["files"].append(str(result.mapper.save(f"{args.out}/ideal-mapper-{data.name}{suffix}.npz")))
        write_json(report, path)
    if args.package_out:
        package = ship_policy(ckpt, report, result.mapper, args.package_out, args.ship)
        report.setdefault("files", []).append(str(package))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(table(report))
        for f in report.get("files", []):
            print(f"wrote {f}")
    return 0


def ship_policy(ckpt, report: dict, mapper, out: str, name: str | None):
    """Export `ckpt`'s device package with the replayed policy `name`, calibrated as it was replayed."""
    import tempfile

    from paramcast.cloud.export import export_package
    from paramcast.common.errors import InvalidInput

    rows = {row["name"]: row for row in report["policies"]}
    if name is None and len(rows) != 1:
        raise InvalidInput("--ship", f"{len(rows)} policies were replayed; name the one to ship: {', '.join(rows)}")
    row = rows.get(name) if name is not None else next(iter(rows.values()))
    if row is None:
        raise InvalidInput("--ship", f"no replayed policy is called {name!r}; replayed: {', '.join(rows)}")
    fitted = {"threshold": row["policy_config"].get("threshold"), "dataset": report.get("dataset"),
              "command": report.get("command"), **({"validation": row["validation"]} if "validation" in row else {})}
    with tempfile.TemporaryDirectory() as tmp:
        mapper_file = mapper.save(f"{tmp}/mapper.npz") if row["policy"] == "ideal" else None
        return export_package(ckpt, out, policy=row["name"], mapper=mapper_file, policy_fitted=fitted)

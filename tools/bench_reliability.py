"""Reliability benchmark: a long chaos run and a long bundle fuzz, written to benchmarks/results/reliability.json.

    OMP_NUM_THREADS=1 python tools/bench_reliability.py                      # a few minutes
    OMP_NUM_THREADS=1 python tools/bench_reliability.py --model runs/ml-100k --fuzz-mutants 400000

The chaos run (paramcast.reliability.chaos) drives `--devices` device processes against
`paramcast serve` on loopback with per-device tokens and a download byte rate, kills the server
with SIGKILL `--server-restarts` times (the first mid-download), kills devices mid-download,
mid-write and `--device-kills` times each at random, and sends a bad-input load; then it checks
every device's state. The fuzz (paramcast.reliability.fuzz) sends `--fuzz-mutants` mutated bundles
(or as many as `--fuzz-seconds` allow) through decode -> verify -> apply -> score on the model's
own package.

Headline keys: `faults_injected` (server kills, device kills, bad requests), `calls_failed_after_retries`
(device calls that failed after the client's retries -- all of them while the server was down,
which `calls_failed_while_server_up` = 0 shows), `bundles_lost` (must be 0), `fuzz_mutants`,
`fuzz_crashes` (must be 0), `rss_growth_bad_input` (server RSS after the bad-input load over before
it, after a warm-up round of the same load, minus one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from paramcast.bench_service import quick_model  # noqa: E402
from paramcast.common.package import DevicePackage  # noqa: E402
from paramcast.reliability.chaos import ChaosConfig, run_chaos  # noqa: E402
from paramcast.reliability.fuzz import fuzz_bundles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir with its package in DIR/package (default: train a "
                                               "quick one with the default architecture on --data)")
    p.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "ml-100k")
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--server-restarts", type=int, default=3)
    p.add_argument("--device-kills", type=int, default=2, help="random SIGKILLs per device")
    p.add_argument("--refresh-seconds", type=float, default=15.0, help="refresh phase between faults")
    p.add_argument("--bad-requests", type=int, default=5000)
    p.add_argument("--fuzz-mutants", type=int, default=100_000)
    p.add_argument("--fuzz-seconds", type=float, default=120.0, help="stop the fuzz early after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep the run's state here: every device's directory, journal and "
                                                 "log (default: a temporary directory, removed)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reliability.json")
    args = p.parse_args(argv)

    started = time.perf_counter()
    command = "OMP_NUM_THREADS=1 python tools/bench_reliability.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="paramcast-reliability-") as tmp:
        workdir = args.workdir or Path(tmp)
        model = args.model or quick_model(workdir, args.data)
        package = DevicePackage.load(model / "package")
        print(f"model {package.model_id} {package.base_version}", flush=True)
        chaos = run_chaos(ChaosConfig(model_dir=model, workdir=workdir / "chaos", devices=args.devices,
                                      server_restarts=args.server_restarts, device_kills=args.device_kills,
                                      refresh_seconds=args.refresh_seconds, bad_requests=args.bad_requests,
                                      seed=args.seed, log=lambda line: print(line, flush=True)))
        chaos_summary = chaos.summary()
        print(json.dumps(chaos_summary), flush=True)
        fuzz = fuzz_bundles(package, args.fuzz_mutants, seed=args.seed, max_seconds=args.fuzz_seconds)
        fuzz_summary = fuzz.summary()
        print(json.dumps(fuzz_summary), flush=True)
        model_info = {"model_id": package.model_id, "base_version": package.base_version,
                      "package_bytes": package.size_bytes(), "hidden": package.hidden,
                      "slots": {n: [s.d_in, s.d_out, s.max_rank] for n, s in package.slots.items()}}

    doc = {
        "benchmark": "reliability",
        "command": command,
        "faults_injected": chaos_summary["faults_injected"],
        "calls_failed_after_retries": chaos.calls_failed_after_retries,
        "calls_failed_while_server_up": chaos.calls_failed_while_server_up,
        "bundles_lost": chaos.bundles_lost,
        "fuzz_mutants": fuzz.mutants,
        "fuzz_crashes": len(fuzz.crashes),
        "fuzz_accepted_corrupt": len(fuzz.accepted_corrupt),
        "rss_growth_bad_input": chaos.rss_growth_bad_input,
        "definitions": {
            "faults_injected": "server SIGKILLs (mid-download and mid-run), device SIGKILLs (mid-download, mid-write, "
                               "at random) and bad-input requests",
            "calls_failed_after_retries": "device refreshes that ended unreachable and start-up downloads that "
                                          "failed, after the client's own retries and resumes",
            "bundles_lost": "devices whose state, opened after the run, holds no bundle or an older one than the "
                            "last they applied",
            "fuzz_crashes": "mutants that raised anything but a typed refusal, or were applied and scored "
                            "non-finite numbers",
            "rss_growth_bad_input": "server RSS after the bad-input load over RSS before it (after a warm-up round), "
                                    "minus one",
        },
        "chaos": chaos_summary,
        "fuzz": fuzz_summary,
        "settings": {"devices": args.devices, "server_restarts": args.server_restarts,
                     "device_kills": args.device_kills, "refresh_seconds": args.refresh_seconds,
                     "bad_requests": args.bad_requests, "fuzz_mutants_asked": args.fuzz_mutants,
                     "fuzz_seconds": args.fuzz_seconds, "seed": args.seed},
        "model": model_info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"faults_injected {doc['faults_injected']}  calls_failed_after_retries {doc['calls_failed_after_retries']}  "
          f"bundles_lost {doc['bundles_lost']}  fuzz_mutants {doc['fuzz_mutants']}  fuzz_crashes "
          f"{doc['fuzz_crashes']}  rss_growth_bad_input {doc['rss_growth_bad_input']:.4f}")
    print(f"wrote {args.out}")
    return 1 if chaos.problems or fuzz.crashes or fuzz.accepted_corrupt else 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality benchmark: train + evaluate one dataset over several seeds -> benchmarks/results/quality-<name>.json.

Runs the same code paths as `paramcast train` and `paramcast evaluate` in one process per seed and
records, beside the variant metrics, training time, peak resident memory and model sizes. The top
level of the JSON is the first seed's `paramcast evaluate --json` report; `seeds` holds every
seed's headline numbers so the spread across seeds is visible.

    python tools/bench_quality.py --data ../shared/data/amazon-beauty --seeds 42,43,44
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HEADLINE = ("static", "generated", "generated-static", "slimmed@0.5", "int8", "cold:generated-static")


def run_seed(args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    """One seed in a fresh process, so its peak RSS is its own."""
    out = workdir / f"seed{seed}"
    cmd = [sys.executable, "-m", "tools.cli", "train", "--data", args.data, "--out", str(out), "--seed", str(seed),
           "--no-progress", *args.train_args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    report_file = out / "evaluate.json"
    subprocess.run([sys.executable, "-m", "tools.cli", "evaluate", "--model", str(out), "--data", args.data,
                    "--json", "--out", str(report_file)], check=True, stdout=subprocess.DEVNULL)
    meta = json.loads((out / "bundle.json").read_text())
    return {"report": json.loads(report_file.read_text()), "bundle": meta, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--workdir", default="runs/quality")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `paramcast train` flags after --")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    name = Path(args.data.rstrip("/")).name
    workdir = Path(args.workdir) / name
    runs = {int(s): run_seed(args, int(s), workdir) for s in args.seeds.split(",")}
    first = runs[min(runs)]
    doc = dict(first["report"])
    doc["seeds"] = {
        str(seed): {
            "wall_seconds": r["wall_seconds"],
            "static_seconds": r["bundle"]["meta"]["seconds"]["static"],
            "peak_rss_mib": r["bundle"]["meta"].get("peak_rss_mib"),
            "static_epochs": len(r["bundle"]["meta"]["history"]["static"]),
            "generator_epochs": len(r["bundle"]["meta"]["history"]["generator"]),
            **{v: {m: r["report"][v][m] for m in ("hr@10", "ndcg@10", "auc")} for v in HEADLINE if v in r["report"]},
        }
        for seed, r in runs.items()
    }
    doc["meta"] = {
        "dataset": name,
        "command": "python tools/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_config": first["bundle"]["device_config"],
        "generator_config": first["bundle"]["generator_config"],
        "train_config": first["bundle"]["meta"]["train_config"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": first["bundle"]["meta"]["cpu_count"]},
        "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    path = Path(args.results) / f"quality-{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    """One seed in a fresh process, so its peak RSS is its own. A seed whose checkpoint and report are
    already in `workdir` is reused, so more seeds can be added to a finished run."""
    out = workdir / f"seed{seed}"
    report_file = out / "evaluate.json"
    if report_file.exists() and (out / "checkpoint.json").exists():
        meta = json.loads((out / "checkpoint.json").read_text())
        return {"report": json.loads(report_file.read_text()), "checkpoint": meta,
                "wall_seconds": meta["meta"]["wall_seconds"]}
    cmd = [sys.executable, "-m", "paramcast.cli", "train", "--data", args.data, "--out", str(out), "--seed", str(seed),
           "--no-progress", *args.train_args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "paramcast.cli", "evaluate", "--model", str(out), "--data", args.data,
                    "--protocol", "both", "--json", "--out", str(report_file)], check=True, stdout=subprocess.DEVNULL)
    meta = json.loads((out / "checkpoint.json").read_text())
    return {"report": json.loads(report_file.read_text()), "checkpoint": meta, "wall_seconds": wall}


def sizes(model_dir: Path, data_path: str) -> dict:
    """Model sizes and wire bytes of the default configuration, measured on the trained checkpoint."""
    import numpy as np
    import torch

    from paramcast.cloud.bundles import generate_bundles
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.generator import KEEP_RATIOS
    from paramcast.common.bundle import ENCODINGS
    from paramcast.common.data import load_interactions
    from paramcast.common.serde import encode_bundle

    ckpt = load_checkpoint(model_dir)
    data = load_interactions(data_path)
    device, gen = ckpt.device_model, ckpt.generator
    out: dict = {"device": {"parameters": device.n_parameters(), "flops_per_user_101": device.flops_per_user()}}
    for ratio in KEEP_RATIOS:
        keep = {g: torch.arange(n) < max(1, round(ratio * n)) for g, n in device.unit_groups().items()}
        small = device.slimmed(keep)
        out[f"slimmed@{ratio}"] = {"parameters": small.n_parameters(), "flops_per_user_101": small.flops_per_user(),
                                   "non_embedding_parameters": small.n_parameters() - small.item_emb.weight.numel()}
    out["device"]["non_embedding_parameters"] = device.n_parameters() - device.item_emb.weight.numel()
    if gen is not None:
        windows = [s[-gen.cfg.window:] for s in data.sequences[:256]]
        bundles = generate_bundles(ckpt, windows)
        slim = generate_bundles(ckpt, windows, keep_ratio=0.5)
        out["generator"] = {"parameters": gen.n_parameters(),
                            "trainable_parameters": sum(p.numel() for p in gen.parameters() if p.requires_grad),
                            "flops_per_bundle": gen.flops_per_bundle(),
                            "generated_parameters_per_device": gen.generated_parameters_per_device()}
        out["bytes_per_bundle"] = {enc: float(np.mean([len(encode_bundle(b, enc)) for b in bundles]))
                                   for enc in ENCODINGS}
        out["bytes_per_bundle_with_masks@0.5"] = {enc: float(np.mean([len(encode_bundle(b, enc)) for b in slim]))
                                                  for enc in ENCODINGS}
        n = gen.generated_parameters_per_device()
        out["bytes_per_generated_parameter"] = {enc: v / n for enc, v in out["bytes_per_bundle"].items()}
    return out


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
            "static_seconds": r["checkpoint"]["meta"]["seconds"]["static"],
            "peak_rss_mib": r["checkpoint"]["meta"].get("peak_rss_mib"),
            "static_epochs": len(r["checkpoint"]["meta"]["history"]["static"]),
            "generator_epochs": len(r["checkpoint"]["meta"]["history"]["generator"]),
            **{v: {m: r["report"][v][m] for m in ("hr@10", "ndcg@10", "auc", "full:hr@10", "full:ndcg@10")
                   if m in r["report"][v]} for v in HEADLINE if v in r["report"]},
        }
        for seed, r in runs.items()
    }
    doc["sizes"] = sizes(workdir / f"seed{min(runs)}", args.data)
    doc["meta"] = {
        "dataset": name,
        "command": "python tools/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device_config": first["checkpoint"]["device_config"],
        "generator_config": first["checkpoint"]["generator_config"],
        "train_config": first["checkpoint"]["meta"]["train_config"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": first["checkpoint"]["meta"]["cpu_count"]},
        "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    path = Path(args.results) / f"quality-{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

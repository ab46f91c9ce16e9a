"""Quality benchmark: train + evaluate one dataset over several seeds -> benchmarks/results/quality-<name>.json.

Runs the same code paths as `paramcast train` and `paramcast evaluate` in one process per seed and
records, beside the variant metrics, training time, peak resident memory and model sizes. The top
level of the JSON is the first seed's `paramcast evaluate --json` report; `seeds` lists every
seed's headline numbers (static, generated, cloud, generated-static, gap_closed) so the spread
across seeds is visible, and `cold:pooled` pools the cold users of every seed into one paired
generated - static difference (one seed has too few cold users for a tight interval).

    python tools/bench_quality.py --data ../shared/data/amazon-beauty --seeds 42,43,44

A seed whose run is no longer on disk can be carried from an earlier results file of this benchmark
(`--carry FILE`): its row (and, for the first seed, the top-level report and sizes) is kept as that
file recorded it, provided the file's configurations equal this run's; `meta.carried` names those
seeds and the command that measured them. Cold users are pooled over the seeds whose models are on
disk, and `cold:pooled.seeds` lists them.
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

HEADLINE = ("static", "generated", "cloud", "generated-static", "cloud-static", "gap_closed", "slimmed@0.5",
            "stale@20", "stale@20-static", "int8", "cold:generated-static")
SEED_KEYS = ("static", "generated", "cloud", "generated-static", "gap_closed")
# what must be equal for a carried seed to stand beside freshly run ones
CONFIG_KEYS = ("device_config", "generator_config", "cloud_config", "train_config")
RUN_ONLY = ("seed", "resume", "progress")  # train_config entries that may differ between seeds


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
    # the cloud item table the head.cloud slot scores against: a frozen buffer, not a parameter
    out["device"]["cloud_item_table_values"] = device.cloud_item_table.numel() if device.cfg.cloud_items else 0
    if ckpt.cloud_model is not None:
        out["cloud"] = {"parameters": ckpt.cloud_model.n_parameters(),
                        "flops_per_request_101": ckpt.cloud_model.flops_per_request()}
    if gen is not None:
        windows = [s[-gen.cfg.window:] for s in data.sequences[:256]]
        bundles = generate_bundles(ckpt, windows)
        slim = generate_bundles(ckpt, windows, keep_ratio=0.5)
        out["generator"] = {"parameters": gen.n_parameters(),
                            "trainable_parameters": sum(p.numel() for p in gen.parameters() if p.requires_grad),
                            "flops_per_bundle": gen.flops_per_bundle(device.flops_per_user(0)),
                            "generated_parameters_per_device": gen.generated_parameters_per_device()}
        out["bytes_per_bundle"] = {enc: float(np.mean([len(encode_bundle(b, enc)) for b in bundles]))
                                   for enc in ENCODINGS}
        out["bytes_per_bundle_with_masks@0.5"] = {enc: float(np.mean([len(encode_bundle(b, enc)) for b in slim]))
                                                  for enc in ENCODINGS}
        n = gen.generated_parameters_per_device()
        out["bytes_per_generated_parameter"] = {enc: v / n for enc, v in out["bytes_per_bundle"].items()}
    return out


def pooled_cold(model_dirs: list[Path], data_path: str) -> dict:
    """generated - static over the cold users of every seed together (each seed holds out its own)."""
    import numpy as np

    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.evaluate import per_user_metrics
    from paramcast.common.data import load_interactions
    from paramcast.common.evaluation import paired_difference

    data = load_interactions(data_path)
    parts: dict[str, list] = {"generated": [], "static": []}
    for d in model_dirs:
        ckpt = load_checkpoint(d)
        if ckpt.generator is None:
            return {}
        cold_raw = set(ckpt.meta["split"]["cold_users"])
        cold = np.array([u for u in range(data.n_users) if data.user_raw_ids[u] in cold_raw], dtype=np.int64)
        m = per_user_metrics(ckpt, data, cold, "test", ["static", "generated"])
        for v in parts:
            parts[v].append(m[v])
    pooled = {v: {k: np.concatenate([p[k] for p in ps]) for k in ps[0]} for v, ps in parts.items()}
    return {"generated-static": paired_difference(pooled["generated"], pooled["static"]),
            "seeds": [int(d.name.removeprefix("seed")) for d in model_dirs]}


def comparable(meta: dict) -> dict:
    """A results file's configurations without what legitimately differs from seed to seed."""
    out = {k: meta.get(k) for k in CONFIG_KEYS}
    out["train_config"] = {k: v for k, v in (out["train_config"] or {}).items() if k not in RUN_ONLY}
    return out


def check_carry(carried: dict, fresh: dict) -> None:
    """Refuse to mix seeds trained under different configurations."""
    a, b = comparable(carried["meta"]), comparable(fresh)
    diff = [f"{k}.{kk}" for k in CONFIG_KEYS for kk in sorted(set(a[k] or {}) | set(b[k] or {}))
            if (a[k] or {}).get(kk) != (b[k] or {}).get(kk)]
    if diff:
        raise SystemExit(f"--carry: {carried['meta']['command']!r} was trained differently ({', '.join(diff)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--workdir", default="runs/quality")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--carry", help="an earlier quality-<dataset>.json whose seeds stand in for runs not on disk")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `paramcast train` flags after --")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    name = Path(args.data.rstrip("/")).name
    workdir = Path(args.workdir) / name
    seeds = [int(s) for s in args.seeds.split(",")]
    carried_doc: dict = json.loads(Path(args.carry).read_text()) if args.carry else {}
    carried_rows = {r["seed"]: r for r in carried_doc.get("seeds", [])}
    carried = [s for s in seeds if s in carried_rows and not (workdir / f"seed{s}" / "checkpoint.json").exists()]
    runs = {s: run_seed(args, s, workdir) for s in seeds if s not in carried}
    if not runs:
        raise SystemExit("--carry: at least one seed must be run (or be on disk) here")
    first = runs[min(runs)]
    fresh_meta = {"device_config": first["checkpoint"]["device_config"],
                  "generator_config": first["checkpoint"]["generator_config"],
                  "cloud_config": first["checkpoint"].get("cloud_config"),
                  "train_config": first["checkpoint"]["meta"]["train_config"]}
    if carried:
        check_carry(carried_doc, fresh_meta)
    first_carried = bool(carried) and min(carried) < min(runs)
    doc = ({k: v for k, v in carried_doc.items() if k not in ("seeds", "cold:pooled", "sizes", "meta")}
           if first_carried else dict(first["report"]))
    rows = {s: carried_rows[s] for s in carried}
    rows.update({
        seed: {
            "seed": seed,
            **{v: {m: r["report"][v][m] for m in ("hr@10", "ndcg@10", "auc", "full:hr@10", "full:ndcg@10")
                   if m in r["report"][v]} for v in SEED_KEYS if v in r["report"]},
            "details": {
                "wall_seconds": r["wall_seconds"],
                "seconds": r["checkpoint"]["meta"]["seconds"],
                "peak_rss_mib": r["checkpoint"]["meta"].get("peak_rss_mib"),
                "epochs": {stage: len(h) for stage, h in r["checkpoint"]["meta"]["history"].items()},
                **{v: {m: r["report"][v][m] for m in ("hr@10", "ndcg@10", "auc") if m in r["report"][v]}
                   for v in HEADLINE if v in r["report"] and v not in SEED_KEYS},
            },
        }
        for seed, r in runs.items()
    })
    doc["seeds"] = [rows[s] for s in sorted(rows)]
    doc["cold:pooled"] = pooled_cold([workdir / f"seed{s}" for s in sorted(runs)], args.data)
    doc["sizes"] = carried_doc["sizes"] if first_carried else sizes(workdir / f"seed{min(runs)}", args.data)
    doc["meta"] = {
        "dataset": name,
        "command": "python tools/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **fresh_meta,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": first["checkpoint"]["meta"]["cpu_count"]},
        "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    if carried:
        doc["meta"]["carried"] = {"seeds": carried, "command": carried_doc["meta"]["command"]}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    path = Path(args.results) / f"quality-{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

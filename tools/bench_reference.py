"""Reference benchmark: `paramcast train --preset sasrec-reference` once per loss, both protocols ->
benchmarks/results/reference-<dataset>.json.

Each loss trains in a fresh process (so its wall time and peak RSS are its own) on the static stage
only, then `paramcast evaluate --protocol both` scores it on the validation and the test split.
The loss named `best` is chosen on VALIDATION alone, by a rule that needs no published figures, so
the same command works on a dataset nobody has measured:

    qualify: validation NDCG@10 under the sampled protocol at least that of `bce`, the reference's
             own loss, trained by the same command (bce always qualifies). NDCG@10 alone: requiring
             HR@10 too let a loss whose full-ranking NDCG@10 is half the others' win on a sparse log
             (amazon-beauty) by a HR@10 margin inside its CI;
    best:    the qualifying loss with the highest full-ranking validation NDCG@10.

Test figures are recorded beside, never used to choose. With --target HR,NDCG (the published
reference's test figures for this dataset) each loss also records whether it reached them.

    python tools/bench_reference.py --data ../shared/data/ml-100k --losses bce,gbce,sampled,ce -- --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_LOSS = "bce"
PROTOCOL_KEYS = {"sampled": ("hr@10", "ndcg@10"), "full": ("full:hr@10", "full:ndcg@10")}


def _cli(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "paramcast.cli", *args], check=True, stdout=subprocess.DEVNULL, env=env)


def figures(report: dict) -> dict:
    """{"sampled": {"hr@10", "ndcg@10"}, "full": {"hr@10", "ndcg@10"}} of the static model, plus CIs."""
    static = report["static"]
    out: dict = {}
    for protocol, keys in PROTOCOL_KEYS.items():
        out[protocol] = {k.removeprefix("full:"): static[k]["value"] for k in keys}
        out[protocol]["ci"] = {k.removeprefix("full:"): static[k]["ci"] for k in keys}
    return out


def checkpoint_meta(out: Path) -> Path:
    """The checkpoint's JSON metadata (`bundle.json` in runs written before checkpoints were renamed)."""
    old = out / "bundle.json"
    return old if old.exists() else out / "checkpoint.json"


def run_loss(args: argparse.Namespace, loss: str, workdir: Path) -> dict:
    """Train and evaluate one loss; a finished run in `workdir` is reused, so losses can be added, and an
    interrupted one continues where its last validation left it (`paramcast train --resume`)."""
    out = workdir / loss.replace("+", "-")
    reports = {stage: out / f"evaluate-{stage}.json" for stage in ("valid", "test")}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if not checkpoint_meta(out).exists():
        t0 = time.perf_counter()
        _cli("-v", "train", "--data", args.data, "--out", str(out), "--preset", "sasrec-reference",  # -v: epoch log
             "--stages", "static", "--loss", loss, "--seed", str(args.seed), "--threads", str(args.threads),
             "--no-progress", "--resume", *args.train_args, env=env)
        (out / "wall_seconds").write_text(f"{time.perf_counter() - t0}\n")
    for stage, path in reports.items():
        if not path.exists():
            _cli("evaluate", "--model", str(out), "--data", args.data, "--variants", "static", "--protocol", "both",
                 "--stage", stage, "--json", "--out", str(path), env=env)
    meta = json.loads(checkpoint_meta(out).read_text())["meta"]
    valid, test = (figures(json.loads(reports[s].read_text())) for s in ("valid", "test"))
    history = meta["history"]["static"]
    return {"loss": loss, "epochs": len(history), "best_epoch": meta["best_epoch"]["static"],
            "seconds": float((out / "wall_seconds").read_text()), "train_seconds": meta["seconds"]["static"],
            "cpu_seconds": meta.get("cpu_seconds"), "threads": meta["torch_threads"],
            "peak_rss_mib": meta["peak_rss_mib"], **test, "valid": valid,
            "loss_config": meta["loss"], "history": history}


def popularity_baseline(data_path: str, seed: int = 0) -> dict:
    """Validation and test figures of the model-free popularity ranking, both protocols: how hard
    each split is before any model is trained."""
    import numpy as np

    from paramcast.cloud.evaluate import popularity_metrics
    from paramcast.common.data import load_interactions
    from paramcast.common.evaluation import summarize

    data = load_interactions(data_path)
    users = np.arange(data.n_users)
    return {stage: figures({"static": summarize(popularity_metrics(data, users, stage, seed, "both"), seed=seed)})
            for stage in ("valid", "test")}


def paired_against(data_path: str, workdir: Path, best: str, others: list[str], seed: int = 0) -> dict:
    """{loss: best - loss} on the validation users, paired per user and bootstrapped, both protocols:
    whether the choice's margins are larger than the noise of one validation split."""
    import numpy as np

    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.evaluate import per_user_metrics
    from paramcast.common.data import load_interactions
    from paramcast.common.evaluation import paired_difference

    data = load_interactions(data_path)
    users = np.arange(data.n_users)

    def metrics(loss: str) -> dict:
        ckpt = load_checkpoint(workdir / loss.replace("+", "-"))
        return per_user_metrics(ckpt, data, users, "valid", ["static"], seed, "both")["static"]

    chosen = metrics(best)
    out = {}
    for loss in others:
        diff = paired_difference(chosen, metrics(loss), seed=seed)
        out[loss] = {k: diff[k] for k in ("hr@10", "ndcg@10", "full:hr@10", "full:ndcg@10")}
    return out


def choose(results: list[dict]) -> tuple[str, list[str]]:
    """(best loss, qualifying losses) by the rule in the module docstring, on validation only."""
    by_loss = {r["loss"]: r for r in results}
    ref = by_loss.get(REFERENCE_LOSS)
    qualifying = [r["loss"] for r in results if ref is None
                  or r["valid"]["sampled"]["ndcg@10"] >= ref["valid"]["sampled"]["ndcg@10"]]
    best = max(qualifying, key=lambda name: by_loss[name]["valid"]["full"]["ndcg@10"])
    return best, qualifying


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--losses", default="bce,gbce,sampled,ce", help="comma list of --loss values to train")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads of every run")
    p.add_argument("--target", help="HR@10,NDCG@10 the published reference reaches on this test split")
    p.add_argument("--workdir", default="runs/reference")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--suffix", default="", help="results file reference-<dataset>[-suffix].json, for variant runs")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `paramcast train` flags after --")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    name = Path(args.data.rstrip("/")).name
    workdir = Path(args.workdir) / (name + (f"-{args.suffix}" if args.suffix else ""))
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    results = [run_loss(args, loss, workdir) for loss in losses]
    target = None
    if args.target:
        hr, ndcg = (float(x) for x in args.target.split(","))
        target = {"hr@10": hr, "ndcg@10": ndcg}
        for r in results:
            r["reaches_target"] = all(r["sampled"][m] >= target[m] for m in target)
    best, qualifying = choose(results)
    doc = {
        "dataset": name,
        "best": best,
        "selection": {"rule": f"validation sampled NDCG@10 >= the {REFERENCE_LOSS} run's; then the "
                              "highest validation full-ranking NDCG@10", "qualifying": qualifying,
                      "paired_valid": paired_against(args.data, workdir, best, [r["loss"] for r in results
                                                                                if r["loss"] != best])},
        "target": target,
        "variant": {"suffix": args.suffix, "train_args": args.train_args} if args.suffix else None,
        "popularity": popularity_baseline(args.data),
        "losses": results,
        "meta": {"command": "python tools/bench_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "seed": args.seed, "threads": args.threads,
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}},
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    path = Path(args.results) / f"reference-{name}{f'-{args.suffix}' if args.suffix else ''}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

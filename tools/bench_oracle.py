"""What the delta format can carry: per-user factors optimised directly against the cloud model.

For a sample of validation users, the factors of one slot (or of both head slots) at rank r are
fitted per user, by gradient descent, so that the frozen device model with that delta, on the
device's own window, reproduces the cloud model's next-item distribution at the validation point
(KL over the catalogue; the true item is never used). The fitted delta is then scored under the
SASRec protocol on the validation case. `gap_closed` = (oracle - static) / (cloud - static) is the
share of the cloud model's lead that a delta of this shape could carry if the generator were
perfect; it bounds what the generator can reach and guides the choice of slots and rank.

`head.cloud` (and `head+cloud`, all three slots) fits the slot that maps the user state into the
cloud model's item space (cloud/model.py); a model trained without it is given the cloud model's
item table for the fit. Also reported: a plain vector added to the device's user state (what a rank-1 `head.down` delta
with a constant A reduces to), as the simplest shape, and every fit after int8 encoding.

    python tools/bench_oracle.py --model runs/ml-100k --data ../shared/data/ml-100k --users 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from paramcast.cloud.checkpoint import load_checkpoint
from paramcast.cloud.evaluate import negatives_for
from paramcast.cloud.model import left_pad
from paramcast.cloud.oracle import cloud_log_probs, fit_oracle, fit_state_offset
from paramcast.common.bundle import dequantize, quantize
from paramcast.common.data import load_interactions
from paramcast.common.evaluation import LeaveOneOut, gap_closed, metrics_from_scores

SLOTS = {"head.down": ["head.down"], "head.up": ["head.up"], "head": ["head.up", "head.down"],
         "head.cloud": ["head.cloud"], "head+cloud": ["head.up", "head.down", "head.cloud"]}


def int8(adapters):
    return {slot: tuple(torch.from_numpy(np.stack([dequantize(quantize(x, "int8")) for x in t.numpy()]))
                        for t in pair) for slot, pair in adapters.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory with a cloud model")
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, default=300, help="validation users sampled")
    p.add_argument("--ranks", default="1,2,4,8,16")
    p.add_argument("--slots", default="head.down,head.up,head,head.cloud,head+cloud")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="JSON file (default benchmarks/results/oracle-<dataset>.json)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.model)
    if ckpt.cloud_model is None:
        raise SystemExit(f"{args.model}: no cloud model; train with the cloud stage")
    data = load_interactions(args.data)
    model, cloud = ckpt.device_model.eval(), ckpt.cloud_model.eval()
    if not model.cfg.cloud_items and any("head.cloud" in SLOTS[s] for s in args.slots.split(",")):
        model.carry_cloud_items(cloud.output_table())  # adds zero to every score until fitted
    model.requires_grad_(False)
    cloud.requires_grad_(False)
    cold_raw = set(ckpt.meta.get("split", {}).get("cold_users", []))
    warm = np.array([u for u in range(data.n_users) if data.user_raw_ids[u] not in cold_raw], dtype=np.int64)
    users = LeaveOneOut.of(data, warm).eval_users()
    rng = np.random.default_rng(args.seed)
    users = np.sort(rng.choice(users, size=min(args.users, len(users)), replace=False))
    split = LeaveOneOut.of(data, users)
    cases = [split.case(int(u), "valid") for u in users]
    hist = [h for h, _ in cases]
    targets = np.array([t for _, t in cases])
    cand = torch.as_tensor(np.concatenate([targets[:, None], negatives_for(data, users, "valid", 0)], axis=1))
    seq = left_pad(hist, model.cfg.max_len)
    teacher_logp = cloud_log_probs(cloud, hist)  # (U, n_items)
    with torch.no_grad():
        static = metrics_from_scores(model.score(seq, cand).numpy())
        cloud_m = metrics_from_scores(cloud.score(left_pad(hist, cloud.cfg.max_len, trim=True), cand).numpy())

    def row(metrics: dict, extra: dict) -> dict:
        gc = gap_closed(metrics, static, cloud_m, seed=args.seed)["ndcg@10"]
        return {**extra, "ndcg@10": float(metrics["ndcg@10"].mean()), "hr@10": float(metrics["hr@10"].mean()),
                "gap_closed": gc["value"], "gap_closed_ci": gc["ci"]}

    results = []
    t0 = time.perf_counter()
    offset = fit_state_offset(model, seq, teacher_logp, args.steps, args.lr)
    with torch.no_grad():
        user = model.base_state(seq) + offset
        scores = (model.item_emb(cand) * user[:, None, :]).sum(-1)
    results.append(row(metrics_from_scores(scores.numpy()), {"slot": "user-state offset", "rank": None,
                                                             "parameters": model.cfg.hidden}))
    shapes = model.slot_shapes()
    for name in args.slots.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            adapters = fit_oracle(model, seq, teacher_logp, SLOTS[name], rank, args.steps, args.lr, args.seed)
            with torch.no_grad():
                fp32 = metrics_from_scores(model.score(seq, cand, adapters).numpy())
                q = metrics_from_scores(model.score(seq, cand, int8(adapters)).numpy())
            n_params = sum(rank * sum(shapes[s]) for s in SLOTS[name])
            r = row(fp32, {"slot": name, "rank": rank, "parameters": n_params})
            r["int8_ndcg@10"] = float(q["ndcg@10"].mean())
            results.append(r)
            print(f"{name:>10} rank {rank:>2}: ndcg@10 {r['ndcg@10']:.4f} gap closed {r['gap_closed']:.2f} "
                  f"(int8 {r['int8_ndcg@10']:.4f})", flush=True)
    report = {
        "users": int(len(users)), "stage": "valid", "steps": args.steps, "lr": args.lr,
        "static": {"ndcg@10": float(static["ndcg@10"].mean()), "hr@10": float(static["hr@10"].mean())},
        "cloud": {"ndcg@10": float(cloud_m["ndcg@10"].mean()), "hr@10": float(cloud_m["hr@10"].mean())},
        "oracle": results, "seconds": time.perf_counter() - t0,
        "command": "python tools/bench_oracle.py --model MODEL --data " + args.data + f" --users {args.users}",
    }
    out = Path(args.out or f"benchmarks/results/oracle-{data.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "oracle"}, indent=2))


if __name__ == "__main__":
    main()

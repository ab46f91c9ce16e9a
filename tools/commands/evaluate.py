"""`paramcast evaluate`: test metrics of every model variant, sampled and/or full-catalogue ranking, with 95% CIs."""

from __future__ import annotations

import argparse
import json

from paramcast.common.data import FORMATS, load_interactions
from paramcast.common.evaluation import FULL_PREFIX, METRICS, PROTOCOLS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of static / generated / slimmed / stale variants",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (from paramcast train)")
    p.add_argument("--data", required=True, help="the dataset the model was trained on")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--variants", help="comma list (default: all the bundle supports), e.g. static,generated,stale@5")
    p.add_argument("--stage", default="test", choices=("test", "valid", "held-out"),
                   help="held-out: validation cases of the users early stopping did not score (a model trained "
                        "with --valid-users N), for choices made after training")
    p.add_argument("--refine-steps", type=int,
                   help="refinement steps of every generated delta (default: the generator's own; refined@K "
                        "variants set their own)")
    p.add_argument("--refine-positions", type=int,
                   help="the window's last positions refinement fits (default: the generator's own)")
    p.add_argument("--protocol", default="sampled", choices=PROTOCOLS,
                   help="sampled: the target among 100 sampled unseen items (SASRec's); full: among the whole "
                        "catalogue, the user's other items excluded (metrics full:*); both")
    p.add_argument("--full-ranking", action="store_const", const="full", dest="protocol",
                   help="the same as --protocol full")
    p.add_argument("--against", metavar="DIR",
                   help="a second checkpoint trained on the same data and split: adds <variant>-against, this "
                        "model minus that one, paired over the same users, cases and negatives")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives and the bootstrap")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.evaluate import evaluate
    from paramcast.common.errors import InvalidInput

    ckpt = load_checkpoint(args.model)
    data = load_interactions(args.data, format=args.format)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    if args.refine_steps is not None:
        if args.refine_steps < 0:
            raise InvalidInput("--refine-steps", f"must be >= 0; got {args.refine_steps}")
        if ckpt.generator is None:
            raise InvalidInput("--refine-steps", f"model {ckpt.model_id} has no generator")
        ckpt.generator.cfg.refine_steps = args.refine_steps
    if args.refine_positions is not None:
        if args.refine_positions < 1 or ckpt.generator is None:
            raise InvalidInput("--refine-positions", f"must be >= 1, for a model with a generator; got "
                                                     f"{args.refine_positions}")
        ckpt.generator.cfg.refine_positions = args.refine_positions
    against = load_checkpoint(args.against) if args.against else None
    report = evaluate(ckpt, data, variants, stage=args.stage, seed=args.seed, protocol=args.protocol,
                      against=against)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.json else table(report))
    return 0


def table(report: dict) -> str:
    present = {m for ms in report.values() for m in ms}
    metrics = [m for m in (*METRICS, *(FULL_PREFIX + m for m in METRICS)) if m in present]
    rows = [f"{'variant':<24}" + "".join(f"{m:>26}" for m in metrics)]
    for variant, ms in report.items():
        cells = []
        for m in metrics:
            if m in ms:
                lo, hi = ms[m]["ci"]
                cells.append(f"{ms[m]['value']:>9.4f} [{lo:.4f}, {hi:.4f}]")
            else:
                cells.append("")
        rows.append(f"{variant:<24}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(rows)

"""`paramcast train`: the static device model, the cloud model, then the generator that distils the cloud model
into per-device deltas, into a checkpoint."""

from __future__ import annotations

import argparse
import json
import resource
import time

from paramcast.common.data import FORMATS, load_interactions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train the device model and its generator into a checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder or interaction file")
    p.add_argument("--format", choices=FORMATS, help="skip format detection")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--stages", default="static,cloud,generator",
                   help="comma list of: static, cloud, generator (the generator distils the cloud model)")
    p.add_argument("--start", metavar="DIR",
                   help="checkpoint whose trained models are kept: its device model (base version unchanged) "
                        "and, unless --stages has cloud, its cloud model; the listed later stages are retrained")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Defaults sized for a phone: DUET's device model (hidden 32, one block) over a 50-item window.
    m = p.add_argument_group("device model")
    m.add_argument("--hidden", type=int, default=32)
    m.add_argument("--blocks", type=int, default=1)
    m.add_argument("--heads", type=int, default=1)
    m.add_argument("--ffn-units", type=int, default=32)
    m.add_argument("--head-units", type=int, default=64)
    m.add_argument("--max-len", type=int, default=50, help="the device's window: items its model reads")
    m.add_argument("--dropout", type=float, default=0.5)
    c = p.add_argument_group("cloud model (the generator's encoder and teacher)")
    c.add_argument("--cloud-hidden", type=int, default=64)
    c.add_argument("--cloud-blocks", type=int, default=2)
    c.add_argument("--cloud-heads", type=int, default=2)
    c.add_argument("--cloud-ffn-units", type=int, default=128)
    c.add_argument("--cloud-dropout", type=float, default=0.2)
    c.add_argument("--cloud-batch-size", type=int, default=32, help="0 = --batch-size")
    c.add_argument("--no-side-features", action="store_true", help="the cloud model ignores item side features")
    c.add_argument("--cloud-lr", type=float, default=0.0, help="0 = --lr")
    c.add_argument("--window", type=int, default=200,
                   help="history items the cloud model reads, and so the generator (the cloud model's max-len)")
    t = p.add_argument_group("static stage")
    t.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping on validation NDCG@10")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=5)
    t.add_argument("--loss", default="auto", choices=("auto", "ce", "sampled"),
                   help="softmax CE over the catalogue, or over shared sampled negatives (auto: CE up to 50k items)")
    t.add_argument("--negatives", type=int, default=1024, help="sampled negatives per batch for --loss sampled")
    t.add_argument("--cold-fraction", type=float, default=0.1, help="users held out of training (cold-start eval)")
    t.add_argument("--valid-users", type=int, default=0, help="validation users for early stopping (0 = all)")
    g = p.add_argument_group("generator stage")
    g.add_argument("--gen-epochs", type=int, default=30)
    g.add_argument("--gen-lr", type=float, default=1e-4)
    g.add_argument("--gen-patience", type=int, default=5)
    g.add_argument("--rank", type=int, default=4, help="rank r of generated factors")
    g.add_argument("--gen-width", type=int, default=256, help="width of the generator's MLP")
    g.add_argument("--gen-dropout", type=float, default=0.1)
    g.add_argument("--tune-encoder", action="store_true",
                   help="fine-tune the generator's copy of the cloud encoder (default: frozen teacher)")
    g.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of KL(cloud model || device + delta) beside the true next items")
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--gen-holdout", type=int, default=0,
                   help="last training items per user kept from stage 1 as stage-2-only targets")
    g.add_argument("--horizon", type=int, default=4, help="next items after the cut a delta is trained on")
    g.add_argument("--gen-cuts", type=int, default=4, help="cut points per training sequence and epoch")
    g.add_argument("--gen-staleness", type=int, default=0,
                   help="train deltas for use up to this many interactions after their window")
    g.add_argument("--slim-prob", type=float, default=0.5, help="share of generator batches under a random mask")
    t.add_argument("--slim-train-prob", type=float, default=0.25,
                   help="share of static batches under random unit masks (keeps subnets usable)")
    g.add_argument("--joint", action="store_true", help="fine-tune the device model jointly in stage 2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paramcast.cloud.checkpoint import load_checkpoint, save_checkpoint
    from paramcast.cloud.cloud_model import CloudModelConfig
    from paramcast.cloud.model import DeviceModelConfig
    from paramcast.cloud.train import TrainConfig, train
    from paramcast.common.errors import InvalidInput

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - {"static", "cloud", "generator"}
    if unknown or ("static" not in stages and not args.start) or ("static" in stages and args.start):
        raise InvalidInput("--stages", "must include 'static' (or, with --start, leave it out) and may add 'cloud', "
                                       f"then 'generator' (which distils the cloud model); got {args.stages!r}")
    start = load_checkpoint(args.start) if args.start else None
    if "generator" in stages and "cloud" not in stages and (start is None or start.cloud_model is None):
        raise InvalidInput("--stages", "the generator distils the cloud model: add 'cloud' or --start a model "
                                       "checkpoint that has one")
    data = load_interactions(args.data, format=args.format)
    model_cfg = DeviceModelConfig(n_items=data.n_items, hidden=args.hidden, n_blocks=args.blocks, n_heads=args.heads,
                                  ffn_units=args.ffn_units, head_units=args.head_units, max_len=args.max_len,
                                  dropout=args.dropout)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                      loss=args.loss, n_negatives=args.negatives, seed=args.seed, device=args.device,
                      threads=args.threads, cold_fraction=args.cold_fraction, valid_users=args.valid_users,
                      gen_epochs=args.gen_epochs, gen_lr=args.gen_lr, gen_patience=args.gen_patience,
                      horizon=args.horizon, slim_prob=args.slim_prob, joint=args.joint, gen_holdout=args.gen_holdout,
                      slim_train_prob=args.slim_train_prob, distill_weight=args.distill_weight,
                      cloud_batch_size=args.cloud_batch_size, cloud_lr=args.cloud_lr,
                      side_features=not args.no_side_features, gen_cuts=args.gen_cuts,
                      gen_staleness=args.gen_staleness,
                      distill_temperature=args.distill_temperature, progress=not args.no_progress)
    cloud_cfg = CloudModelConfig(n_items=data.n_items, hidden=args.cloud_hidden, n_blocks=args.cloud_blocks,
                                 n_heads=args.cloud_heads, ffn_units=args.cloud_ffn_units, max_len=args.window,
                                 dropout=args.cloud_dropout)
    gen_cfg = {"rank": args.rank, "width": args.gen_width, "dropout": args.gen_dropout,
               "tune_encoder": args.tune_encoder}
    t0 = time.perf_counter()
    ckpt = train(data, args.out, model_cfg, cfg, gen_cfg, stages, cloud_cfg, start)
    ckpt.meta["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    ckpt.meta["wall_seconds"] = time.perf_counter() - t0
    out = save_checkpoint(ckpt, args.out)
    summary = {"model_id": ckpt.model_id, "base_version": ckpt.base_version, "out": str(out),
               "seconds": round(ckpt.meta["wall_seconds"], 1), "peak_rss_mib": round(ckpt.meta["peak_rss_mib"]),
               "device_parameters": ckpt.device_model.n_parameters()}
    if ckpt.cloud_model is not None:
        summary.update(cloud_parameters=ckpt.cloud_model.n_parameters(),
                       cloud_flops_per_request=ckpt.cloud_model.flops_per_request())
    if ckpt.generator is not None:
        summary.update(generator_parameters=ckpt.generator.n_parameters(),
                       generated_parameters_per_device=ckpt.generator.generated_parameters_per_device(),
                       generator_flops_per_bundle=ckpt.generator.flops_per_bundle(
                           ckpt.device_model.flops_per_user(0)))
    print(json.dumps(summary, indent=2))
    return 0

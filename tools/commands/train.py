"""`paramcast train`: the static device model, the cloud model, then the generator that distils the cloud model
into per-device deltas, into a checkpoint.

    paramcast train --data ../shared/data/ml-100k --out runs/ml-100k
    torchrun --standalone --nproc-per-node 2 -m paramcast.cli train --data ... --out runs/ml-100k

Under `torchrun` every stage trains with DistributedDataParallel (cloud/distributed.py): gloo on
CPU, NCCL on CUDA, the batch size is the global one, and only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable

from paramcast.common.data import FORMATS, load_interactions

# Registering the command imports nothing from paramcast.cloud (the device-only install has no
# torch): loss and preset names are checked when given, against the modules that define them.


def _loss_name(value: str) -> str:
    from paramcast.cloud.losses import LossConfig

    if value != "auto":
        try:
            LossConfig(name=value).components()
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _preset_name(value: str) -> str:
    from paramcast.cloud.presets import PRESETS

    if value not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {value!r}; known: {', '.join(PRESETS)}")
    return value


# Options a --preset may set: registered with default None so that an explicit flag is told apart
# from an unset one; run() fills the unset ones from the preset, then from these defaults.
DEFAULTS: dict[str, int | float | str] = {}


def _option(group, flag: str, kind: Callable[[str], object], default: int | float | str, help: str = "",
            **kwargs) -> None:
    DEFAULTS[flag.lstrip("-").replace("-", "_")] = default
    group.add_argument(flag, type=kind, default=None, help=f"{help} (default: {default})".lstrip(), **kwargs)


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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = every core this process may use)")
    p.add_argument("--preset", type=_preset_name,
                   help="sasrec-reference: the public SASRec reference's settings (hidden 50, 2 blocks, 1 head, "
                        "lr 1e-3, batch 128, every user in training, no unit dropout; max-len/dropout 200/0.2 when "
                        "the median user sequence has >= 30 items, else 50/0.5); flags given explicitly win")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="save the static and cloud stages' progress in --out after each validation and continue "
                        "from it if present")
    # Defaults sized for a phone: DUET's device model (hidden 32, one block) over a 50-item window.
    m = p.add_argument_group("device model")
    _option(m, "--hidden", int, 32)
    _option(m, "--blocks", int, 1)
    _option(m, "--heads", int, 1)
    _option(m, "--ffn-units", int, 32)
    _option(m, "--head-units", int, 64)
    _option(m, "--max-len", int, 50, help="the device's window: items its model reads")
    _option(m, "--dropout", float, 0.5)
    _option(m, "--block", str, "pre-ln", choices=("pre-ln", "sasrec"),
            help="the device model's block arrangement: pre-ln, or the original SASRec's (cloud/model.py Block)")
    _option(m, "--padding-attention", str, "masked", choices=("masked", "visible"),
            help="masked: queries see only real items; visible: also the left padding of the --max-len window, "
                 "as the public SASRec reference (cloud/model.py sequence_inputs)")
    _option(m, "--init", str, "scaled", choices=("scaled", "xavier", "reference"),
            help="initialisation: scaled N(0, 1/d) items; xavier-normal embeddings; or xavier-normal for "
                 "every weight matrix, as the public SASRec reference (cloud/model.py DeviceModelConfig)")
    c = p.add_argument_group("cloud model (the generator's encoder and teacher)")
    c.add_argument("--cloud-hidden", type=int, default=64)
    c.add_argument("--cloud-blocks", type=int, default=2)
    c.add_argument("--cloud-heads", type=int, default=2)
    c.add_argument("--cloud-ffn-units", type=int, default=128)
    c.add_argument("--cloud-dropout", type=float, default=None,
                   help="default: by the log's median sequence length, the rule of the reference preset "
                        "(cloud/presets.py sequence_regime): 0.2 on dense logs, 0.5 on sparse ones")
    c.add_argument("--cloud-block", default="pre-ln", choices=("pre-ln", "sasrec"),
                   help="the cloud model's block arrangement (as --block for the device model)")
    c.add_argument("--cloud-batch-size", type=int, default=32, help="0 = --batch-size")
    c.add_argument("--no-side-features", action="store_true", help="the cloud model ignores item side features")
    c.add_argument("--user-features", action="store_true",
                   help="the cloud model also reads the users' side features (ml-100k u.user, ml-1m users.dat): "
                        "an upper bound only, since requests carry no profile; needs --stages without generator")
    c.add_argument("--cloud-lr", type=float, default=0.0, help="0 = --lr")
    c.add_argument("--cloud-patience", type=int, default=0,
                   help="the cloud stage's patience in epochs (0 = --patience)")
    c.add_argument("--window", type=int, default=200,
                   help="history items the cloud model reads, and so the generator (the cloud model's max-len)")
    t = p.add_argument_group("static stage")
    _option(t, "--epochs", int, 200, help="upper bound; early stopping on validation NDCG@10")
    _option(t, "--batch-size", int, 128)
    _option(t, "--lr", float, 1e-3)
    _option(t, "--patience", int, 5, help="epochs without validation improvement before stopping")
    _option(t, "--warmup-epochs", int, 10, help="the static and cloud stages count patience from this epoch at the "
                                                "earliest (a model first sits on the popularity plateau)")
    _option(t, "--eval-every", int, 1, help="epochs between validations")
    _option(t, "--lr-decay", float, 0.0,
            help="multiply the learning rate by this after --lr-decay-after epochs without a better validation "
                 "score, counted again from each decay (0: a constant rate)")
    _option(t, "--lr-decay-after", int, 10, help="epochs without a better validation score before a decay")
    _option(t, "--lr-schedule", str, "constant", choices=("constant", "cosine"),  # cloud/train.py LR_SCHEDULES
            help="cosine: the static and cloud stages' learning rate falls along half a cosine from --lr to "
                 "zero over --epochs (constant: --lr throughout)")
    _option(t, "--ema", float, 0.0,
            help="decay per step of a moving average of the static and cloud models' weights, validated and "
                 "kept instead of the last step's (0: off)")
    _option(t, "--loss-weighting", str, "position", choices=("position", "batch"),
            help="position: every target position of an epoch weighs the same, however the length-bucketed "
                 "batches group them; batch: each batch's loss is the mean over its own positions")
    _option(t, "--bucket-batches", int, 32,
            help="every stage: batches per length-sorted chunk of the shuffled sequences, so a batch pads only "
                 "to its own longest history; 1: every batch drawn at random")
    t.add_argument("--select", default="sampled", choices=("sampled", "full"),
                   help="protocol whose validation NDCG@10 early stopping maximises")
    _option(t, "--loss", _loss_name, "auto",
            help="bce | gbce | sampled | ce | a mixture x+y (e.g. ce+bce); auto: the validated default, "
                 "cloud/presets.py DEFAULT_LOSS (a full softmax over more than 50k items falls back to "
                 "sampled + logQ); a preset sets its own")
    t.add_argument("--negatives", type=int, default=0,
                   help="uniform negatives: per position for bce (default 1), per sequence for gbce and sampled "
                        "(default 256)")
    t.add_argument("--gbce-t", type=float, default=0.75, help="gBCE calibration t in [0, 1] (0: plain BCE)")
    t.add_argument("--logq", action="store_true", help="logQ correction of sampled-softmax negatives")
    t.add_argument("--mix-weight", type=float, default=1.0, help="weight of the second loss of a mixture x+y")
    _option(t, "--cold-fraction", float, 0.1, help="users held out of training (cold-start eval)")
    _option(t, "--valid-users", int, 0, help="validation users for early stopping (0 = all)")
    g = p.add_argument_group("generator stage")
    g.add_argument("--gen-epochs", type=int, default=30)
    g.add_argument("--gen-lr", type=float, default=3e-4)
    g.add_argument("--gen-patience", type=int, default=5)
    g.add_argument("--rank", type=int, default=4, help="rank r of generated factors")
    g.add_argument("--gen-width", type=int, default=128, help="width of the generator's MLP")
    g.add_argument("--gen-dropout", type=float, default=0.3)
    g.add_argument("--tune-encoder", action="store_true",
                   help="fine-tune the generator's copy of the cloud encoder (default: frozen teacher)")
    g.add_argument("--no-cloud-expectation", action="store_true",
                   help="the generator does not read the cloud's expected next item in device item space")
    g.add_argument("--kl-gradient", action="store_true",
                   help="the generator also reads E'(p_cloud - p_device), the direction in which the device's "
                        "distillation loss falls fastest at its own state")
    g.add_argument("--cloud-slot", action=argparse.BooleanOptionalAction, default=None,
                   help="the device package carries the cloud model's item table and bundles a third slot, "
                        "head.cloud, that moves scores in the cloud's item space (cloud/model.py); on by default")
    g.add_argument("--refine-steps", type=int, default=0,
                   help="Adam steps refining each generated delta against the cloud model's next-item distribution "
                        "when a bundle is made (cloud/oracle.py fit_factors; `paramcast evaluate --variants "
                        "refined@K` measures K without retraining)")
    g.add_argument("--refine-lr", type=float, default=0.05, help="step size of that refinement")
    g.add_argument("--refine-positions", type=int, default=1,
                   help="the window's last positions whose cloud distributions refinement fits")
    g.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of KL(cloud model || device + delta) beside the true next items")
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--gen-cut-from", type=float, default=0.0,
                   help="draw the generator's cut points from this share of each sequence on (0: anywhere)")
    g.add_argument("--gen-holdout", type=int, default=0,
                   help="last training items per user kept from stage 1 as stage-2-only targets")
    g.add_argument("--gen-ema", type=float, default=0.0,
                   help="decay per step of a moving average of the generator's weights, validated and kept "
                        "instead of the last step's (0: off)")
    g.add_argument("--gen-users", type=float, default=0.0,
                   help="share of the warm users the cloud model does not fit and the generator learns on alone")
    g.add_argument("--horizon", type=int, default=4, help="next items after the cut a delta is trained on")
    g.add_argument("--gen-cuts", type=int, default=4, help="cut points per training sequence and epoch")
    g.add_argument("--gen-staleness", type=int, default=20,
                   help="train deltas for use up to this many interactions after their window")
    g.add_argument("--slim-prob", type=float, default=0.5, help="share of generator batches under a random mask")
    _option(t, "--slim-train-prob", float, 0.25,
            help="share of static batches under random unit masks (keeps subnets usable)")
    g.add_argument("--joint", action="store_true", help="fine-tune the device model jointly in stage 2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from paramcast.cloud import distributed
    from paramcast.cloud.checkpoint import load_checkpoint, save_checkpoint
    from paramcast.cloud.cloud_model import CloudModelConfig
    from paramcast.cloud.model import DeviceModelConfig
    from paramcast.cloud.presets import sequence_regime
    from paramcast.cloud.train import TrainConfig, distils_a_profile_reader, train
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
    if distils_a_profile_reader(args.user_features, stages, start):
        raise InvalidInput("--user-features" if args.user_features else "--start",
                           "a cloud model that reads user features cannot be distilled (requests carry no "
                           "profile): train it with --stages static,cloud or --start DIR --stages cloud")
    if not 0.0 <= args.gen_users < 1.0:
        raise InvalidInput("--gen-users", f"is a share of the warm users, in [0, 1); got {args.gen_users}")
    if args.gen_users and "cloud" not in stages:
        raise InvalidInput("--gen-users", "keeps users out of the cloud stage: add 'cloud' to --stages")
    data = load_interactions(args.data, format=args.format)
    apply_preset(args, data)
    if not 0.0 <= args.lr_decay < 1.0:
        raise InvalidInput("--lr-decay", f"is a factor in [0, 1) (0: no decay); got {args.lr_decay}")
    if args.lr_decay_after < 1:
        raise InvalidInput("--lr-decay-after", f"must be at least one epoch; got {args.lr_decay_after}")
    if args.bucket_batches < 1:
        raise InvalidInput("--bucket-batches", f"must be at least one batch; got {args.bucket_batches}")
    if args.cloud_patience < 0:
        raise InvalidInput("--cloud-patience", f"must be zero (--patience) or more epochs; got {args.cloud_patience}")
    if args.warmup_epochs < 0:
        raise InvalidInput("--warmup-epochs", f"must be zero or more epochs; got {args.warmup_epochs}")
    if args.lr_decay > 0 and args.lr_schedule != "constant":
        raise InvalidInput("--lr-decay", f"is a plateau schedule and --lr-schedule {args.lr_schedule} another; "
                                         "give one")
    for flag, decay in (("--ema", args.ema), ("--gen-ema", args.gen_ema)):
        if not 0.0 <= decay < 1.0:
            raise InvalidInput(flag, f"is a decay per step in [0, 1) (0: off); got {decay}")
    model_cfg = DeviceModelConfig(n_items=data.n_items, hidden=args.hidden, n_blocks=args.blocks, n_heads=args.heads,
                                  ffn_units=args.ffn_units, head_units=args.head_units, max_len=args.max_len,
                                  dropout=args.dropout, init=args.init, block=args.block,
                                  padding_attention=args.padding_attention)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                      warmup_epochs=args.warmup_epochs,
                      loss=args.loss, n_negatives=args.negatives, seed=args.seed, device=args.device,
                      threads=args.threads, cold_fraction=args.cold_fraction, valid_users=args.valid_users,
                      gen_epochs=args.gen_epochs, gen_lr=args.gen_lr, gen_patience=args.gen_patience,
                      horizon=args.horizon, slim_prob=args.slim_prob, joint=args.joint, gen_holdout=args.gen_holdout,
                      gen_cut_from=args.gen_cut_from, gen_users=args.gen_users, gen_ema=args.gen_ema,
                      ema=args.ema,
                      slim_train_prob=args.slim_train_prob, eval_every=args.eval_every, select=args.select,
                      loss_weighting=args.loss_weighting, bucket_batches=args.bucket_batches,
                      lr_decay=args.lr_decay, lr_decay_after=args.lr_decay_after, lr_schedule=args.lr_schedule,
                      gbce_t=args.gbce_t, logq=args.logq, mix_weight=args.mix_weight,
                      distill_weight=args.distill_weight,
                      cloud_batch_size=args.cloud_batch_size, cloud_lr=args.cloud_lr,
                      cloud_patience=args.cloud_patience,
                      side_features=not args.no_side_features,
                      user_features=args.user_features, gen_cuts=args.gen_cuts,
                      gen_staleness=args.gen_staleness,
                      **({} if args.cloud_slot is None else {"cloud_slot": args.cloud_slot}),
                      distill_temperature=args.distill_temperature, progress=not args.no_progress, resume=args.resume)
    cloud_cfg = CloudModelConfig(n_items=data.n_items, hidden=args.cloud_hidden, n_blocks=args.cloud_blocks,
                                 n_heads=args.cloud_heads, ffn_units=args.cloud_ffn_units, max_len=args.window,
                                 dropout=args.cloud_dropout, block=args.cloud_block)
    gen_cfg = {"rank": args.rank, "width": args.gen_width, "dropout": args.gen_dropout,
               "tune_encoder": args.tune_encoder, "cloud_expectation": not args.no_cloud_expectation,
               "kl_gradient": args.kl_gradient, "refine_steps": args.refine_steps, "refine_lr": args.refine_lr,
               "refine_positions": args.refine_positions}
    if args.refine_steps < 0:
        raise InvalidInput("--refine-steps", f"must be >= 0; got {args.refine_steps}")
    if args.refine_lr <= 0:
        raise InvalidInput("--refine-lr", f"must be > 0; got {args.refine_lr}")
    if args.refine_positions < 1:
        raise InvalidInput("--refine-positions", f"must be >= 1; got {args.refine_positions}")
    if args.kl_gradient and args.no_cloud_expectation:
        raise InvalidInput("--kl-gradient", "needs the cloud's expectation: drop --no-cloud-expectation")
    ctx = distributed.context(args.device)  # a world of one unless started by torchrun
    if not ctx.is_writer:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports for the job
    t0 = time.perf_counter()
    ckpt = train(data, args.out, model_cfg, cfg, gen_cfg, stages, cloud_cfg, start)
    if not ctx.is_writer:
        ctx.close()  # waits while rank 0 writes, then leaves with it
        return 0
    if args.preset:
        ckpt.meta["preset"] = {"name": args.preset, "rule": sequence_regime(data)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ckpt.meta["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    # CPU seconds beside wall seconds: on a shared machine the wall time depends on everyone's load.
    ckpt.meta["cpu_seconds"] = usage.ru_utime + usage.ru_stime
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
    ctx.close()
    return 0


# Preset keys that name a config field differently from the flag's destination.
_PRESET_TO_FLAG = {"n_blocks": "blocks", "n_heads": "heads"}


def apply_preset(args: argparse.Namespace, data) -> None:
    """Fill every preset-able option not given on the command line: from --preset, else its default;
    and the cloud model's dropout from the log's sequence regime, unless given."""
    from paramcast.cloud.presets import preset, sequence_regime

    chosen: dict = {}
    if args.preset:
        model, training = preset(args.preset, data)
        chosen = {_PRESET_TO_FLAG.get(k, k): v for k, v in {**model, **training}.items()}
    for dest, default in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, chosen.get(dest, default))
    if args.cloud_dropout is None:
        # The cloud model is wider and deeper than the device model and, at 0.2, overfits a sparse
        # log within a few epochs and ends below the device model it should teach.
        args.cloud_dropout = sequence_regime(data)["dropout"]

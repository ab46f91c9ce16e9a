"""`paramcast export`: write the device package (model.onnx + manifest.json) of a trained model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write the ONNX device package of a checkpoint",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint (from `paramcast train`)")
    parser.add_argument("--out", required=True, metavar="PKG", help="package directory to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 17; default 18)")
    parser.add_argument("--max-rank", type=int, default=None,
                        help="largest factor rank a device accepts (default: the generator's rank)")
    parser.add_argument("--policy", default=None, metavar="SPEC",
                        help="request policy the device loop runs, shipped in the package (e.g. every-k:10, "
                             "drift:threshold=0.05, ideal:threshold=0.02; a gate needs its threshold: "
                             "`paramcast simulate --package-out` calibrates one to a rate)")
    parser.add_argument("--mapper", default=None, metavar="FILE.npz",
                        help="the IDEAL gate's fitted mapper (`paramcast simulate --out` writes ideal-mapper-*.npz)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level: `paramcast device` must work without it.
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.export import DEFAULT_OPSET, export_package
    from paramcast.common.errors import InvalidInput
    from paramcast.common.package import DevicePackage
    from paramcast.device.ideal import GaussianMapper
    from paramcast.device.loop import load_policy
    from paramcast.device.policy_spec import parse_policy

    ckpt = load_checkpoint(args.model)
    # Everything a device would refuse is refused here, before anything is written.
    if args.mapper and not args.policy:
        raise InvalidInput("--mapper", "ships with a policy; give --policy ideal:threshold=T")
    if args.policy:
        spec = parse_policy(args.policy)
        if spec.is_gate and "threshold" not in spec.params:
            raise InvalidInput("--policy", f"{args.policy!r}: a gate on a device needs threshold=T (or a package "
                                           "from `paramcast simulate --package-out`, which calibrates it to a rate)")
        if spec.name == "ideal" and not args.mapper:
            raise InvalidInput("--mapper", "the ideal gate needs its fitted mapper (ideal-mapper-*.npz)")
    hidden = GaussianMapper.load(args.mapper).hidden if args.mapper else ckpt.device_model.cfg.hidden
    if hidden != ckpt.device_model.cfg.hidden:
        raise InvalidInput("--mapper", f"{args.mapper} is for hidden size {hidden}, "
                                       f"the model has {ckpt.device_model.cfg.hidden}")
    out = export_package(ckpt, args.out, opset=args.opset or DEFAULT_OPSET, max_rank=args.max_rank,
                         policy=args.policy, mapper=args.mapper)
    package = DevicePackage.load(out)  # read back what a device reads, sha256 included
    if args.policy:
        load_policy(package)  # and build the policy from it as a device does
    slots = ", ".join(f"{s.name} ({s.d_in}x{s.d_out}, rank <= {s.max_rank})" for s in package.slots.values())
    print(f"{out}: model {package.model_id}, base version {package.base_version}, "
          f"opset {package.manifest['onnx_opset']}, {package.size_bytes():,} bytes")
    print(f"  adapter slots: {slots}")
    print(f"  unit groups: {', '.join(f'{g.name} ({g.n_units})' for g in package.unit_groups.values())}")
    if args.policy:
        print(f"  policy: {args.policy}" + (f" (mapper {args.mapper})" if args.mapper else ""))
    return 0

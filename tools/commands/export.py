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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at module level: `paramcast device` must work without it.
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.export import DEFAULT_OPSET, export_package
    from paramcast.common.package import DevicePackage

    ckpt = load_checkpoint(args.model)
    out = export_package(ckpt, args.out, opset=args.opset or DEFAULT_OPSET, max_rank=args.max_rank)
    package = DevicePackage.load(out)  # read back what a device reads, sha256 included
    slots = ", ".join(f"{s.name} ({s.d_in}x{s.d_out}, rank <= {s.max_rank})" for s in package.slots.values())
    print(f"{out}: model {package.model_id}, base version {package.base_version}, "
          f"opset {package.manifest['onnx_opset']}, {package.size_bytes():,} bytes")
    print(f"  adapter slots: {slots}")
    print(f"  unit groups: {', '.join(f'{g.name} ({g.n_units})' for g in package.unit_groups.values())}")
    return 0

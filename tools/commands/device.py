"""`paramcast device`: run the device side of ParamCast on a device package, with ONNX Runtime only.

Imports nothing from `cloud` and never torch, so it works in an environment with only the
`device` extra installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paramcast.common.errors import InvalidInput


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("device", help="score candidates on a device package (ONNX Runtime)",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="device_command", required=True)

    score = sub.add_parser("score", help="score candidate items for one user's history")
    score.add_argument("--package", required=True, metavar="PKG", help="device package directory")
    score.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    score.add_argument("--candidates", required=True, help="comma-separated item ids to score")
    score.add_argument("--bundle", metavar="FILE", help="a serialized DeltaBundle to apply first")
    score.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    score.add_argument("--json", action="store_true", help="print a JSON object instead of a table")

    info = sub.add_parser("info", help="verify a device package and describe it")
    info.add_argument("--package", required=True, metavar="PKG", help="device package directory")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")

    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paramcast.common.package import DevicePackage

    package = DevicePackage.load(args.package)
    if args.device_command == "info":
        return _info(package, args.json)
    return _score(package, args)


def parse_ids(text: str, field: str) -> list[int]:
    """"1,2, 3" -> [1, 2, 3]; an empty string is an empty list."""
    try:
        return [int(tok) for tok in text.replace(" ", "").split(",") if tok]
    except ValueError:
        raise InvalidInput(field, f"expected comma-separated integer item ids, got {text!r}") from None


def _score(package, args: argparse.Namespace) -> int:
    from paramcast.device.runtime import DeviceRuntime

    history = parse_ids(args.history, "history")
    candidates = parse_ids(args.candidates, "candidates")
    runtime = DeviceRuntime(package, threads=args.threads)
    if args.bundle:
        from paramcast.common.serde import decode_bundle

        runtime.apply(decode_bundle(Path(args.bundle).read_bytes()))
    scores = runtime.score(history, candidates)
    if args.json:
        print(json.dumps({
            "model_id": package.model_id,
            "base_version": package.base_version,
            "bundle_id": runtime.active_bundle_id,
            "candidates": candidates,
            "scores": [float(s) for s in scores],
        }))
        return 0
    print(f"# model {package.model_id} base {package.base_version} bundle {runtime.active_bundle_id or '-'}")
    print("item\tscore")
    for item, s in zip(candidates, scores, strict=True):
        print(f"{item}\t{s:.6f}")
    return 0


def _info(package, as_json: bool) -> int:
    if as_json:
        print(json.dumps(package.manifest, indent=2))
        return 0
    m = package.manifest
    print(f"package       {package.path}")
    print(f"model         {package.model_id} (base version {package.base_version})")
    print(f"onnx opset    {m['onnx_opset']}, {package.size_bytes():,} bytes, sha256 verified")
    print(f"sizes         {package.n_items} items, hidden {package.hidden}, history length {package.max_len}")
    for s in package.slots.values():
        print(f"slot          {s.name}: {s.d_in} x {s.d_out}, rank <= {s.max_rank} "
              f"(inputs {s.a_input}, {s.b_input})")
    for g in package.unit_groups.values():
        print(f"unit group    {g.name}: {g.n_units} units")
    return 0

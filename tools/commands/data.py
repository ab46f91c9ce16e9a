"""`paramcast data`: inspect an interaction log (`info`) or download a MovieLens archive (`fetch`)."""

from __future__ import annotations

import argparse
import json

# numpy-only and needed to list the choices, so imported here rather than inside run().
from paramcast.common.data import FORMATS, load_interactions
from paramcast.common.fetch import ARCHIVES, fetch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect or download interaction data",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="data_command", required=True)

    info = sub.add_parser("info", help="users, items, interactions and sequence lengths of a dataset")
    info.add_argument("path", help="dataset folder or interaction file")
    info.add_argument("--format", choices=FORMATS, help="skip detection and read as this format")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")

    fetch = sub.add_parser("fetch", help="download a MovieLens archive from GroupLens and check its md5")
    fetch.add_argument("dataset", choices=sorted(ARCHIVES))
    fetch.add_argument("--to", required=True, metavar="DIR", help="folder to unzip into")
    fetch.add_argument("--timeout", type=float, default=10.0, help="network timeout in seconds")

    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        print(fetch(args.dataset, args.to, timeout=args.timeout))
        return 0
    summary = load_interactions(args.path, format=args.format).summary()
    print(json.dumps(summary, indent=2) if args.json else _table(summary))
    return 0


def _table(s: dict) -> str:
    lengths = s["sequence_length"]
    rows = [
        ("dataset", s["name"]),
        ("source", s["source"]),
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("density", f"{s['density']:.5f}"),
        ("timestamps", "yes" if s["has_timestamps"] else "no (file order)"),
        ("item features", ", ".join(s["item_features"]) or "none"),
        ("user features", ", ".join(s["user_features"]) or "none"),
        ("sequence length", f"min {lengths['min']}  median {lengths['median']:g}  mean {lengths['mean']:.1f}"
                            f"  p90 {lengths['p90']:.1f}  max {lengths['max']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

"""`paramcast` console script: one sub-command per module in `tools/commands/`.

Each command module defines `register(subparsers)` and imports its heavy dependencies (torch,
onnxruntime, grpc) inside the function that runs it, so `paramcast device ...` works in an
environment that has only the `device` extra.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from paramcast.common.errors import ParamCastError

COMMANDS = ("data", "train", "evaluate", "export", "serve", "device", "simulate", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paramcast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"paramcast.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not in this build
            if exc.name != f"paramcast.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ParamCastError as exc:
        print(f"paramcast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

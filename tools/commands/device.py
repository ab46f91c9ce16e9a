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

    replay = sub.add_parser("run", help="one device replaying a user's interactions against a live server")
    replay.add_argument("--package", required=True, metavar="PKG", help="device package directory")
    replay.add_argument("--server", required=True, metavar="ADDR", help="host:port of `paramcast serve`")
    replay.add_argument("--history", required=True, metavar="FILE",
                        help="the user's interactions, oldest first: item ids separated by whitespace or commas "
                             "(catalogue ids when the package carries a vocabulary and they are not all integers)")
    replay.add_argument("--policy", default=None, metavar="SPEC",
                        help="request policy, e.g. every-k:10 or drift:threshold=0.05 (default: the package's)")
    replay.add_argument("--token", default=None, help="the device's bearer token")
    replay.add_argument("--device-id", default="device-0")
    replay.add_argument("--state", default=None, metavar="DIR", help="device state folder (default: a temporary one)")
    replay.add_argument("--negatives", type=int, default=100, help="sampled negatives per step (HR/NDCG@10)")
    replay.add_argument("--encoding", default="int8", choices=("int8", "fp16", "fp32"))
    replay.add_argument("--seed", type=int, default=0)
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")

    info = sub.add_parser("info", help="verify a device package and describe it")
    info.add_argument("--package", required=True, metavar="PKG", help="device package directory")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")

    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paramcast.common.package import DevicePackage

    package = DevicePackage.load(args.package)
    if args.device_command == "info":
        return _info(package, args.json)
    if args.device_command == "run":
        return _run(package, args)
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


def read_history(path: str | Path, package) -> list[int]:
    """A history file -> model item ids; catalogue ids go through the package's vocabulary."""
    tokens = Path(path).read_text().replace(",", " ").split()
    if not tokens:
        raise InvalidInput("history", f"{path}: no interactions")
    if all(t.lstrip("-").isdigit() for t in tokens) and package.vocabulary is None:
        ids = [int(t) for t in tokens]
    elif package.vocabulary is not None:
        ids = package.vocabulary.model_ids(tokens).tolist()
        if not ids:
            raise InvalidInput("history", f"{path}: none of its items is in the package's vocabulary")
    else:
        raise InvalidInput("history", f"{path}: item ids must be integers (the package has no vocabulary)")
    bad = [i for i in ids if not 1 <= i <= package.n_items]
    if bad:
        raise InvalidInput("history", f"{path}: item id {bad[0]} is outside [1, {package.n_items}]")
    return ids


def _run(package, args: argparse.Namespace) -> int:
    import sys
    import tempfile

    import numpy as np

    from paramcast.common.evaluation import metrics_from_scores
    from paramcast.device.agent import DeviceAgent
    from paramcast.device.client import ParamClient
    from paramcast.device.loop import DeviceLoop

    items = read_history(args.history, package)
    rng = np.random.default_rng(args.seed)
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="paramcast-device-"))
    agent = DeviceAgent(state, package.model_id, device_id=args.device_id, token=args.token,
                        encoding=args.encoding).open_package(package)
    outcomes: dict[str, int] = {}
    hits, ndcgs = [], []
    with ParamClient(args.server, device_id=args.device_id, token=args.token) as client:
        loop = DeviceLoop.from_package(agent, client, spec=args.policy, seed=args.seed)
        loop.observe(items[0])
        seen = {items[0]}
        for t, item in enumerate(items[1:], start=1):
            negatives = _negatives(rng, package.n_items, seen | {item}, args.negatives)
            scores = loop.recommend(np.concatenate([[item], negatives]))
            metrics = metrics_from_scores(scores[None])  # column 0 is the item the user took
            hits.append(float(metrics["hr@10"][0]))
            ndcgs.append(float(metrics["ndcg@10"][0]))
            step = loop.observe(item)
            seen.add(item)
            if step.refresh is not None:
                outcomes[step.refresh.outcome] = outcomes.get(step.refresh.outcome, 0) + 1
            print(f"\rstep {t}/{len(items) - 1}  requests {loop.requests}  applied {loop.applied}  "
                  f"bytes {loop.response_bytes:,}  HR@10 {np.mean(hits):.3f}  NDCG@10 {np.mean(ndcgs):.3f}",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary = {"model_id": package.model_id, "base_version": package.base_version, "policy": args.policy
               or "package", "steps": len(items) - 1, "requests": loop.requests, "applied": loop.applied,
               "outcomes": outcomes, "response_bytes": loop.response_bytes,
               "hr@10": float(np.mean(hits)) if hits else 0.0, "ndcg@10": float(np.mean(ndcgs)) if ndcgs else 0.0,
               "negatives": args.negatives, "serving": agent.serving}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['steps']} steps, {loop.requests} requests ({loop.applied} applied, "
              f"{loop.response_bytes:,} bytes), HR@10 {summary['hr@10']:.4f}, NDCG@10 {summary['ndcg@10']:.4f} "
              f"against {args.negatives} sampled negatives")
    return 0


def _negatives(rng, n_items: int, exclude: set[int], k: int):
    import numpy as np

    out: list[int] = []
    while len(out) < k:
        for i in rng.integers(1, n_items + 1, size=2 * k).tolist():
            if i not in exclude and len(out) < k:
                out.append(i)
                exclude = exclude | {i}
    return np.asarray(out, dtype=np.int64)

"""Codec benchmark: server-side encode time per bundle, one by one vs a whole generator batch.

    python tools/bench_codec.py                     # default model shapes, batch sizes 1 8 64
    python tools/bench_codec.py --sizes 1 64 256 --rank 8

Times, from a generator's stacked numpy output to the wire messages:
- one by one: a DeltaBundle per device, then `bundle_to_proto` for each;
- batched: one `BundleBatch`, then `batch_to_proto` (`BundleBatch.encoded`, what the service's batch compute
  runs, then the message the servicer builds from each).
Both produce the same bytes; the script checks that before timing. Numpy only, one thread, a few
seconds; the minimum over repeats is reported because the wall clock on a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from paramcast.common.bundle import ENCODINGS, BundleBatch  # noqa: E402
from paramcast.common.serde import batch_to_proto, bundle_to_proto  # noqa: E402


def generator_output(n: int, hidden: int, head_units: int, ffn_units: int, rank: int, masks: bool, seed: int = 0):
    """Random stacked factors and masks with the default device model's slot and unit-group shapes."""
    rng = np.random.default_rng(seed)
    shapes = {"head.up": (hidden, head_units), "head.down": (head_units, hidden)}
    factors = {slot: (rng.normal(size=(n, d, rank)).astype(np.float32),  # (n, d, r)
                      (0.05 * rng.normal(size=(n, rank, k))).astype(np.float32))  # (n, r, k)
               for slot, (d, k) in shapes.items()}
    groups = {"head": head_units, "block0.ffn": ffn_units, "block1.ffn": ffn_units}
    keep = {g: rng.random((n, u)) > 0.5 for g, u in groups.items()} if masks else {}  # (n, units)
    return factors, keep


def per_bundle_us(fn, n: int) -> float:
    number = max(1, 256 // n)
    return min(timeit.repeat(fn, number=number, repeat=7)) / number / n * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--head-units", type=int, default=128)
    p.add_argument("--ffn-units", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args(argv)

    print("| encoding | masks | batch | one by one (us/bundle) | batched (us/bundle) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for encoding in ENCODINGS:
        for masks in (False, True):
            for n in args.sizes:
                factors, keep = generator_output(n, args.hidden, args.head_units, args.ffn_units, args.rank, masks)
                batch = BundleBatch.fresh("bench", "v1", factors, keep)
                one = [m.SerializeToString() for m in (bundle_to_proto(b, encoding) for b in batch.unstack())]
                assert [m.SerializeToString() for m in batch_to_proto(batch, encoding)] == one, "bytes differ"

                def one_by_one(batch=batch, encoding=encoding):
                    return [bundle_to_proto(b, encoding) for b in batch.unstack()]

                def batched(batch=batch, encoding=encoding):
                    return batch_to_proto(batch, encoding)

                t_one, t_batch = per_bundle_us(one_by_one, n), per_bundle_us(batched, n)
                print(f"| {encoding} | {'yes' if masks else 'no'} | {n} | {t_one:.1f} | {t_batch:.1f} | "
                      f"{t_one / t_batch:.1f}x |")


if __name__ == "__main__":
    main()

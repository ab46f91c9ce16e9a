"""One device process for the chaos suite: a DeviceAgent that downloads its package, then asks for
bundles in a loop, writing what happens to a journal the controller reads. Imports no torch.

    python -m paramcast.reliability.device_worker --root DIR --target HOST:PORT --model-id M \
        --device-id dev-0 --token T --journal FILE [--die-at-byte N] [--die-at-save K]

The device's own log (the client's retries and resumes, the store's refusals) goes to the
journal's path with `.log` in place of `.jsonl`; SIGUSR1 writes every thread's stack there (for a
device that seems stuck). Journal: one JSON object per line, flushed as it is written (a SIGKILL
loses nothing the process wrote before it): `start`, `download` (first and last offset seen), `opened` (what the agent
serves after start-up, what its store refused, temporaries found before start-up), `refresh`
(outcome and bundle id), `open_failed`. Every line carries `t` (time.time()) and `life` (how many
times this device has started).

Faults the process injects into itself, so that they land exactly where they matter:
- `--die-at-byte N`: SIGKILL once the package download holds N bytes (mid-download);
- `--die-at-save K`: SIGKILL in the middle of the K-th bundle write -- half the bytes in the
  temporary, before the rename (mid-write: the torn state a crash leaves).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

TEMPORARY_SUFFIX = ".tmp"


class Journal:
    def __init__(self, path: Path, life: int):
        self.file = open(path, "a", buffering=1)  # line-buffered: every line reaches the OS at once
        self.life = life

    def write(self, event: str, **fields) -> None:
        self.file.write(json.dumps({"t": time.time(), "life": self.life, "event": event, **fields}) + "\n")


def temporaries(root: Path) -> list[str]:
    """Temporaries and partial downloads under a device's state directory."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(TEMPORARY_SUFFIX))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_write_fault(at_save: int) -> None:
    """Make the `at_save`-th bundle write die half-way through its temporary file."""
    from paramcast.common.files import temporary_path
    from paramcast.device import store

    real = store.write_atomic
    saves = {"n": 0}

    def write_atomic(path, data: bytes) -> None:
        if str(path).endswith(".bundle"):
            saves["n"] += 1
            if saves["n"] == at_save:
                with open(temporary_path(path), "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _die()
        real(path, data)

    store.write_atomic = write_atomic  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--model-id", required=True)
    p.add_argument("--device-id", required=True)
    p.add_argument("--token", default=None)
    p.add_argument("--journal", type=Path, required=True)
    p.add_argument("--life", type=int, default=0)
    p.add_argument("--interval-s", type=float, default=0.1, help="pause between refreshes")
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--die-at-byte", type=int, default=None)
    p.add_argument("--die-at-save", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from paramcast.common.errors import ParamCastError
    from paramcast.device.agent import DeviceAgent
    from paramcast.device.client import ParamClient, RetryPolicy

    journal = Journal(args.journal, args.life)
    log_file = open(args.journal.with_suffix(".log"), "a", buffering=1)
    logging.basicConfig(stream=log_file, level=logging.INFO,
                        format=f"%(asctime)s life {args.life} %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, file=log_file, all_threads=True)
    journal.write("start", pid=os.getpid())
    if args.die_at_save is not None:
        _install_write_fault(args.die_at_save)
    rng = np.random.default_rng(args.seed * 1000 + args.life)
    found = temporaries(args.root) if args.root.exists() else []
    client = ParamClient(args.target, device_id=args.device_id, token=args.token, timeout_s=3.0,
                         download_timeout_s=120.0, max_resumes=50,
                         retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=0.5),
                         reconnect_backoff_s=(0.05, 0.5))
    seen: list[int] = []

    def progress(offset: int, total: int) -> None:
        if not seen:
            journal.write("download", first_offset=offset, total=total)
        seen.append(offset)
        if args.die_at_byte is not None and offset >= args.die_at_byte:
            journal.write("download", last_offset=offset, total=total, dying=True)
            _die()

    agent = DeviceAgent(args.root, args.model_id, device_id=args.device_id, token=args.token)
    while True:  # a device keeps trying to start; the cloud may be down for a while
        try:
            if not (args.root / "current.json").exists():
                client.download_package(args.model_id, args.root, chunk_size=args.chunk_size, progress=progress)
            agent.open(client)
            break
        except ParamCastError as exc:
            journal.write("open_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.5)
    if seen:
        journal.write("download", last_offset=seen[-1])
    journal.write("opened", serving=agent.serving, bundle=agent.bundle.bundle_id if agent.bundle else None,
                  rejected=agent.store.rejected if agent.store else None, temporaries_found=found,
                  temporaries_left=temporaries(args.root), version=agent.base_version)
    assert agent.package is not None
    n_items = agent.package.n_items
    while True:
        window = rng.integers(1, n_items + 1, int(rng.integers(1, 30))).tolist()
        outcome = agent.refresh(client, window)
        journal.write("refresh", outcome=outcome.outcome, bundle=outcome.bundle_id, detail=outcome.detail[:200],
                      seconds=round(outcome.seconds, 4))
        time.sleep(args.interval_s)


if __name__ == "__main__":
    sys.exit(main())

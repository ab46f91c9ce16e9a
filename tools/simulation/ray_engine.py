"""The simulation on a Ray cluster: device shards on `workers` Ray actors.

    ray_cluster.connect(address=None, num_cpus=4)          # or address="auto" on a running cluster
    report = run_simulation(ckpt, data, cfg, engine=RayEngine(ckpt, workers=4, encoding=cfg.encoding))

Each actor is a ShardWorker (shards.py) holding the shards s with s % workers == its index: their
caches are computed there and their replays run there, so neither the model work nor the step
loop passes through the driver, which sends each replay's policy and gets back per-step outcomes
(a few bytes per device-step). The constructor returns once every actor is up, so the actors'
start-up (`startup_seconds`) is not counted in the simulation's throughput. Calibration, the
IDEAL mapper's fit and the report stay in the driver. For a seed and a shard size the report
equals the in-process engine's; parallelism comes from the number of shards (`--shard-devices`),
at most one worker per shard, and pays a Ray round trip per replay, so shards should hold enough
devices for a replay to outweigh it.
"""

from __future__ import annotations

import time

import numpy as np

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.ray_cluster import require_ray
from paramcast.common.errors import InvalidInput
from paramcast.device.policy import Policy
from paramcast.simulation.shards import Network, Piece, ShardPlan, ShardWorker


class RayEngine:
    name = "ray"

    def __init__(self, ckpt: Checkpoint, workers: int, encoding: str = "int8", threads: int = 1,
                 cpus_per_worker: float = 1.0):
        if workers < 1:
            raise InvalidInput("workers", f"must be >= 1, got {workers}")
        ray = require_ray()
        self._ray = ray
        actor = ray.remote(num_cpus=cpus_per_worker)(ShardWorker)
        ckpt_ref = ray.put(ckpt)  # shipped once, shared by every actor on a node
        t0 = time.perf_counter()
        self.actors = [actor.remote(ckpt_ref, encoding, threads) for _ in range(workers)]
        ray.get([a.ready.remote() for a in self.actors])  # start-up is not part of any replay
        self.startup_seconds = time.perf_counter() - t0
        self.workers = workers
        self._shards: dict[str, int] = {}

    def _owned(self, what: str) -> list[list[int]]:
        return [list(range(i, self._shards[what], self.workers)) for i in range(self.workers)]

    def prepare(self, what: str, shards: ShardPlan, bundles: bool = True) -> list[int]:
        self._shards[what] = shards.n_shards
        calls = [actor.prepare.remote(what, {s: shards.tls[s] for s in ids}, bundles)
                 for actor, ids in zip(self.actors, self._owned(what), strict=True) if ids]
        done: dict[int, int] = {}
        for part in self._ray.get(calls):
            done.update(part)
        return [done[s] for s in range(shards.n_shards)]

    def replay(self, what: str, policy: Policy, start: str, seed: int, name: str, network: Network | None = None,
               examples_at: list[np.ndarray] | None = None) -> list[Piece]:
        calls = [actor.replay.remote(what, ids, policy, start, seed, name, network,
                                     {s: examples_at[s] for s in ids} if examples_at is not None else None)
                 for actor, ids in zip(self.actors, self._owned(what), strict=True) if ids]
        pieces: dict[int, Piece] = {}
        for part in self._ray.get(calls):
            pieces.update(part)
        return [pieces[s] for s in range(self._shards[what])]

    def close(self) -> None:
        """Close the actors' network clients and end the actors."""
        try:
            self._ray.get([actor.close.remote() for actor in self.actors])
        finally:
            for actor in self.actors:
                self._ray.kill(actor)
            self.actors = []

"""Devices in shards: the unit the simulation's model work and replays run in, wherever they run.

A set of timelines (the validation or the test devices) is cut into K = ceil(D / shard_devices)
shards: device row r joins shard r % K, so each shard keeps the longest-first order and a like
mix of long and short timelines. A shard is a fleet of its own: a StepCache computed for its
steps only, and per replay a fresh copy of the policy whose state and random draws are seeded
by (seed, shard). Its results are scattered back into the set's flat step order.

An engine only decides where shards live and run: `LocalEngine` keeps them all in this process
and runs them one after another; `RayEngine` (ray_engine.py) spreads them over Ray actors. The
computation of a shard is the same either way, so for a seed and a shard size the report is the
same whatever the engine and however many workers. Shard 0 replays with the run's own seed, so a
set that fits in one shard (the default size holds 2048 devices) is exactly the single-fleet
simulation.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.common.errors import InvalidInput
from paramcast.device.policy import Policy
from paramcast.simulation.cache import Scorer, StepCache, precompute
from paramcast.simulation.replay import CacheSource, Run, Source, replay
from paramcast.simulation.timelines import Timelines

DEFAULT_SHARD_DEVICES = 2048


def shard_seed(seed: int, shard: int) -> int:
    """The replay seed of one shard: the run's seed for shard 0, independent streams for the rest."""
    if shard == 0:
        return seed
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@dataclass
class ShardPlan:
    """How one set of timelines is cut: `tls[s]` are shard s's timelines, `steps[s]` the set's flat
    step index of each of its steps (in the shard's own order), `rows[s]` its device rows."""

    tl: Timelines
    rows: list[np.ndarray]
    steps: list[np.ndarray]
    tls: list[Timelines]

    @property
    def n_shards(self) -> int:
        return len(self.rows)

    def local(self, global_steps: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Flat steps of the set -> per shard, (the shard's local index of each of those steps
        it holds, where each sits in `global_steps`), so results computed shard by shard can be
        put back in the order asked for."""
        where = np.full(self.tl.n_steps, -1, dtype=np.int64)
        shard_of = np.full(self.tl.n_steps, -1, dtype=np.int64)
        for s, steps in enumerate(self.steps):
            where[steps] = np.arange(len(steps))
            shard_of[steps] = s
        owner = shard_of[global_steps]
        return [(where[global_steps[owner == s]], np.flatnonzero(owner == s)) for s in range(self.n_shards)]


def plan(tl: Timelines, shard_devices: int) -> ShardPlan:
    if shard_devices < 1:
        raise InvalidInput("shard_devices", f"must be >= 1, got {shard_devices}")
    k = max(1, -(-tl.n_devices // shard_devices))
    rows = [np.arange(s, tl.n_devices, k, dtype=np.int64) for s in range(k)]
    steps = [np.concatenate([np.arange(tl.start[r], tl.start[r] + tl.length[r]) for r in rs]).astype(np.int64)
             if len(rs) else np.empty(0, np.int64) for rs in rows]
    return ShardPlan(tl, rows, steps, [_timelines_of(tl, rs, st) for rs, st in zip(rows, steps, strict=True)])


def _timelines_of(tl: Timelines, rows: np.ndarray, steps: np.ndarray) -> Timelines:
    """The timelines of some device rows (in order, still longest first) and their flat steps."""
    length = tl.length[rows]
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(rows) else length
    return Timelines(tl.data, tl.users[rows], tl.warmup, start, length, tl.t[steps],
                     np.repeat(np.arange(len(rows)), length), tl.candidates[steps])


@dataclass
class Piece:
    """One shard's replay: per-step outcomes in the shard's order, plus what the network saw."""

    metrics: dict[str, np.ndarray]
    requested: np.ndarray
    received: np.ndarray
    gate: np.ndarray
    network: object | None = None  # NetworkStats of the shard's devices (network mode)
    received_bytes: np.ndarray | None = None  # (D_shard,) GenerateResponse bytes per device
    examples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # mapper examples (behaviour, ref, delta)


@dataclass
class Network:
    """Where test devices get their bundles in network mode, and who scores for them."""

    target: str  # host:port of a ParamService
    model_id: str
    base_version: str
    encoding: str = "int8"
    scoring: str = "agents"  # "agents": device agents on ONNX Runtime; "torch": batched scoring, requests on the wire
    package_dir: str | None = None  # the device package the agents run (the same path on every worker)
    application: str | None = None  # Ray Serve application, when the server runs several


@dataclass
class _Prepared:
    tl: Timelines
    cache: StepCache
    source: Source | None = None  # network mode: the shard's gRPC devices, kept across replays


class ShardWorker:
    """The shards one worker holds - all of them in-process, some on a Ray actor - and what it
    does with them. `threads` fixes torch's thread count, so every worker computes alike."""

    def __init__(self, ckpt: Checkpoint, encoding: str = "int8", threads: int = 1):
        torch.set_num_threads(threads)
        self.ckpt, self.encoding = ckpt, encoding
        self.scorer = Scorer(ckpt.device_model)
        self._sets: dict[str, dict[int, _Prepared]] = {}
        self._agents: tempfile.TemporaryDirectory | None = None  # the device agents' stores, network mode

    def ready(self) -> bool:
        """Answers once the worker is up (a Ray actor has started and imported torch)."""
        return True

    def prepare(self, what: str, shards: dict[int, Timelines], bundles: bool = True) -> dict[int, int]:
        """Compute the caches of `shards` (id -> timelines) of set `what` -> id -> bundle bytes."""
        held = self._sets.setdefault(what, {})
        for sid, tl in shards.items():
            held[sid] = _Prepared(tl, precompute(self.ckpt, tl, self.encoding, progress=False, bundles=bundles))
        return {sid: held[sid].cache.bundle_bytes for sid in shards}

    def replay(self, what: str, shard_ids: list[int], policy: Policy, start: str, seed: int, name: str,
               network: Network | None = None, examples_at: dict[int, np.ndarray] | None = None,
               ) -> dict[int, Piece]:
        """Replay each shard under its own copy of `policy`; `examples_at` (shard -> local steps)
        also returns the IDEAL mapper's training examples at those steps."""
        out = {}
        for sid in shard_ids:
            prep = self._sets[what][sid]
            source = self._network_source(prep, network, f"{what}-{sid}") if network is not None else None
            run = replay(copy.deepcopy(policy), prep.tl, prep.cache, self.scorer,
                         source or CacheSource(prep.cache, prep.tl.n_devices), start, shard_seed(seed, sid), name)
            piece = Piece(run.metrics, run.requested, run.received, run.gate)
            if source is not None:
                piece.network, piece.received_bytes = source.stats, source.received_bytes.copy()  # type: ignore[attr-defined]
            if examples_at is not None:
                piece.examples = _mapper_examples(prep, self.scorer, run, examples_at[sid])
            out[sid] = piece
        return out

    def _network_source(self, prep: _Prepared, network: Network, name: str) -> Source:
        if prep.source is None:
            from paramcast.simulation.network import AgentSource, NetworkSource

            g = self.ckpt.generator.cfg  # type: ignore[union-attr]
            if network.scoring == "agents":
                from paramcast.common.package import DevicePackage

                if network.package_dir is None:
                    raise InvalidInput("package", "device agents need the device package")
                if self._agents is None:
                    self._agents = tempfile.TemporaryDirectory(prefix="paramcast-agents-")
                prep.source = AgentSource(network.target, prep.tl, DevicePackage.load(network.package_dir), g.window,
                                          network.encoding, root=f"{self._agents.name}/{name}",
                                          application=network.application)
            else:
                prep.source = NetworkSource(network.target, prep.tl, network.model_id, network.base_version,
                                            g.slot_shapes, g.rank, g.window, network.encoding,
                                            application=network.application)
        return prep.source

    def close(self) -> None:
        for held in self._sets.values():
            for prep in held.values():
                if prep.source is not None:
                    prep.source.close()  # type: ignore[attr-defined]
                    prep.source = None
        if self._agents is not None:
            self._agents.cleanup()
            self._agents = None


def _mapper_examples(prep: _Prepared, scorer: Scorer, run: Run, steps: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(behaviour now, behaviour at the held bundle, what a fresh bundle changes in the user state)
    at `steps` of a replay: what the IDEAL mapper is fitted on."""
    tl, cache = prep.tl, prep.cache
    held = run.extra["held_row"][steps]  # FactorTable row each step was scored with
    enrolled = held <= tl.n_devices  # enrolment bundle (or base) rather than a requested one
    req_step = np.where(enrolled, -1, held - 1 - tl.n_devices)
    ref = np.where(enrolled[:, None], cache.enrol_behaviour[tl.device[steps]],
                   cache.behaviour[np.maximum(req_step, 0)])
    b = cache.behaviour[steps]
    assert cache.table is not None
    dummy = np.zeros((len(steps), 1), dtype=np.int64)
    user_held, _ = scorer(b, cache.table.gather(held), dummy)
    user_fresh, _ = scorer(b, cache.table.gather(cache.fresh_row(steps, tl.n_devices)), dummy)
    return b, ref, user_fresh - user_held


class Engine(Protocol):
    """Where shards live and run (LocalEngine, RayEngine)."""

    workers: int

    def prepare(self, what: str, shards: ShardPlan, bundles: bool) -> list[int]: ...

    def replay(self, what: str, policy: Policy, start: str, seed: int, name: str, network: Network | None = None,
               examples_at: list[np.ndarray] | None = None) -> list[Piece]: ...

    def close(self) -> None: ...


class LocalEngine:
    """Every shard in this process, one after another."""

    name = "inprocess"
    workers = 1

    def __init__(self, ckpt: Checkpoint, encoding: str = "int8", threads: int | None = None):
        self.worker = ShardWorker(ckpt, encoding, threads or torch.get_num_threads())
        self._shards: dict[str, int] = {}

    def prepare(self, what: str, shards: ShardPlan, bundles: bool = True) -> list[int]:
        self._shards[what] = shards.n_shards
        done = self.worker.prepare(what, dict(enumerate(shards.tls)), bundles)
        return [done[s] for s in range(shards.n_shards)]

    def replay(self, what: str, policy: Policy, start: str, seed: int, name: str, network: Network | None = None,
               examples_at: list[np.ndarray] | None = None) -> list[Piece]:
        ids = list(range(self._shards[what]))
        pieces = self.worker.replay(what, ids, policy, start, seed, name, network,
                                    dict(enumerate(examples_at)) if examples_at is not None else None)
        return [pieces[s] for s in ids]

    def close(self) -> None:
        self.worker.close()


def merge(shards: ShardPlan, pieces: list[Piece], name: str, policy: dict, seconds: float) -> Run:
    """Shard pieces -> the set's Run, every per-step array back in the set's flat step order."""
    n = shards.tl.n_steps
    first = pieces[0]
    metrics = {m: np.empty(n, dtype=v.dtype) for m, v in first.metrics.items()}
    requested, received = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    gate = np.full(n, np.nan, dtype=first.gate.dtype)
    for steps, piece in zip(shards.steps, pieces, strict=True):
        for m, v in piece.metrics.items():
            metrics[m][steps] = v
        requested[steps], received[steps], gate[steps] = piece.requested, piece.received, piece.gate
    run = Run(name, policy, metrics, requested, received, gate, seconds)
    if first.network is not None:
        from paramcast.simulation.network import NetworkStats

        run.extra["network"] = NetworkStats.merged([p.network for p in pieces]).summary()  # type: ignore[misc]
        per_device = np.zeros(shards.tl.n_devices, dtype=np.float64)
        for rows, piece in zip(shards.rows, pieces, strict=True):
            per_device[rows] = piece.received_bytes  # type: ignore[assignment]
        run.extra["bytes_per_device"] = per_device
    return run


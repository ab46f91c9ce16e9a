"""Network mode: every simulated device is a real gRPC client of a running `paramcast serve`.

Each device owns an `AsyncParamClient` (its own channel, its own device id) on one asyncio loop
in a background thread. When the policy picks devices at a step, their Generate calls go out
concurrently and the replay waits for all of them: with `always`, every replaying device is in
flight at once. Bundles come back over the wire, are verified by the client (checksum, model and
base version) and their decoded factors become what the device scores with. A call that fails
leaves the device with what it held, as the device agent does.

The devices' own scoring stays batched in the replay (the same head and dot products as the
exported graph); what this mode adds is the real service on the request path: transport,
micro-batching, encoding, verification, and the load a fleet puts on one server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from paramcast.cloud.model import Adapters
from paramcast.common.errors import InvalidInput, ParamCastError
from paramcast.common.loop import LoopThread
from paramcast.device.client import AsyncParamClient
from paramcast.simulation.timelines import Timelines


@dataclass
class NetworkStats:
    calls: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds per successful call
    bytes: int = 0  # GenerateResponse bytes received
    busy_seconds: float = 0.0  # wall time with calls in flight
    max_in_flight: int = 0

    def summary(self) -> dict:
        lat = np.array(self.latencies) * 1000.0
        return {
            "calls": self.calls,
            "failures": self.failures,
            "errors": self.errors,
            "bytes_received": self.bytes,
            "max_concurrent_calls": self.max_in_flight,
            "bundles_per_s": (self.calls - self.failures) / self.busy_seconds if self.busy_seconds else None,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "mean": float(lat.mean())} if len(lat) else None,
        }


class NetworkSource:
    """A replay Source whose bundles come from a server at `target` (host:port).

    `bytes_per_device` and the latency statistics come from what actually crossed the wire.
    """

    def __init__(self, target: str, tl: Timelines, model_id: str, base_version: str,
                 slot_shapes: dict[str, tuple[int, int]], rank: int, window: int, encoding: str = "int8",
                 device_prefix: str = "sim", timeout_s: float = 30.0):
        self.target, self.tl, self.model_id, self.base_version = target, tl, model_id, base_version
        self.window, self.encoding, self.timeout_s = window, encoding, timeout_s
        self.device_ids = [f"{device_prefix}-{tl.data.user_raw_ids[int(u)]}" for u in tl.users]
        D = tl.n_devices
        self.held = {slot: (np.zeros((D, d_in, rank), np.float32), np.zeros((D, rank, d_out), np.float32))
                     for slot, (d_in, d_out) in slot_shapes.items()}
        self.received_bytes = np.zeros(D, dtype=np.int64)
        self.stats = NetworkStats()
        self._loop = LoopThread("sim-devices")

        async def make_clients():
            return [AsyncParamClient(target, device_id=d, timeout_s=timeout_s) for d in self.device_ids]

        self.clients = self._loop.run(make_clients())

    # -- Source ----------------------------------------------------------------------------------
    def reset(self, start: str) -> None:
        for a, b in self.held.values():
            a[:] = 0.0
            b[:] = 0.0
        self.received_bytes[:] = 0
        self.stats = NetworkStats()
        if start == "bundle":  # every device enrols over the wire: the fleet's first burst
            devices = np.arange(self.tl.n_devices)
            windows = [self.tl.data.sequences[int(u)][: self.tl.warmup] for u in self.tl.users]
            ok = self._fetch(devices, windows)
            if not ok.all():
                raise ParamCastError(f"{int((~ok).sum())} of {len(ok)} devices could not enrol: {self.stats.errors}")

    def adapters(self, n: int) -> Adapters:
        return {slot: (torch.from_numpy(a[:n]), torch.from_numpy(b[:n])) for slot, (a, b) in self.held.items()}

    def request(self, devices: np.ndarray, steps: np.ndarray) -> np.ndarray:
        seqs, users = self.tl.data.sequences, self.tl.users
        windows = [seqs[int(users[self.tl.device[k]])][: int(self.tl.t[k]) + 1] for k in steps]
        return self._fetch(devices, windows)

    # -- calls -------------------------------------------------------------------------------------
    def _fetch(self, devices: np.ndarray, windows: list[np.ndarray]) -> np.ndarray:
        async def one(i: int, device: int, window: np.ndarray):
            try:
                return i, await self.clients[device].generate(
                    window[-self.window:].tolist(), self.model_id, self.base_version, encoding=self.encoding)
            except ParamCastError as exc:
                return i, exc

        async def all_calls():
            return await asyncio.gather(*(one(i, int(d), w) for i, (d, w) in enumerate(zip(devices, windows,
                                                                                             strict=True))))

        t0 = time.perf_counter()
        results = self._loop.run(all_calls())
        self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(devices))
        ok = np.zeros(len(devices), dtype=bool)
        for i, got in results:
            self.stats.calls += 1
            if isinstance(got, Exception):
                self.stats.failures += 1
                name = type(got).__name__
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                continue
            d = int(devices[i])
            for slot, (a, b) in got.bundle.factors.items():
                held_a, held_b = self.held[slot]
                if a.shape != held_a.shape[1:] or b.shape != held_b.shape[1:]:
                    raise InvalidInput("bundle", f"slot {slot} came back as {a.shape}, {b.shape}")
                held_a[d], held_b[d] = a, b
            self.received_bytes[d] += got.response_bytes
            self.stats.latencies.append(got.seconds)
            self.stats.bytes += got.response_bytes
            ok[i] = True
        return ok

    def close(self) -> None:
        async def close_all():
            await asyncio.gather(*(c.close() for c in self.clients))

        self._loop.run(close_all())
        self._loop.stop()


"""Network mode: every simulated device is a real gRPC client of a running `paramcast serve`.

Each device owns an `AsyncParamClient` (its own channel, its own device id) on one asyncio loop
in a background thread. When the policy picks devices at a step, their Generate calls go out
concurrently and the replay waits for all of them: with `always`, every replaying device is in
flight at once. Bundles come back over the wire, are verified by the client (checksum, model and
base version) and their decoded factors become what the device scores with. A call that fails
leaves the device with what it held, as the device agent does.

Two kinds of device. `AgentSource` (the default) makes every device a real device agent
(`device/agent.py`): it scores with ONNX Runtime on the exported package, keeps its bundles in its
own store, and requests, verifies and applies through its own client, so nothing on the device
side is torch. The policy decides for the whole fleet in one call - the same object, seeded the
same way, as the in-process replay, so a seed makes the same requests - from the agents' own
scoring outputs. `NetworkSource` keeps the devices' scoring batched in torch (the same head and
dot products as the graph) and only puts the real service on the request path.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paramcast.cloud.model import Adapters
from paramcast.common.errors import InvalidInput, ParamCastError
from paramcast.common.loop import LoopThread
from paramcast.common.package import DevicePackage
from paramcast.device.agent import DeviceAgent, Refresh
from paramcast.device.client import AsyncParamClient
from paramcast.device.runtime import DeviceRuntime
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

    @classmethod
    def merged(cls, parts: list[NetworkStats]) -> NetworkStats:
        """The stats of several groups of devices (shards) as one fleet's: counts and wall time
        with calls in flight add up, the largest number in flight at once is the largest of any."""
        out = cls()
        for p in parts:
            out.calls += p.calls
            out.failures += p.failures
            for name, n in p.errors.items():
                out.errors[name] = out.errors.get(name, 0) + n
            out.latencies.extend(p.latencies)
            out.bytes += p.bytes
            out.busy_seconds += p.busy_seconds
            out.max_in_flight = max(out.max_in_flight, p.max_in_flight)
        return out

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


class _Fleet:
    """What both sources share: a device id and an `AsyncParamClient` per device on one event loop,
    the fleet's burst of calls, and the statistics of what crossed the wire."""

    def __init__(self, target: str, tl: Timelines, window: int, device_prefix: str, timeout_s: float,
                 application: str | None = None):
        self.target, self.tl, self.window, self.timeout_s = target, tl, window, timeout_s
        self.device_ids = [f"{device_prefix}-{tl.data.user_raw_ids[int(u)]}" for u in tl.users]
        self.received_bytes = np.zeros(tl.n_devices, dtype=np.int64)
        self.stats = NetworkStats()
        self._loop = LoopThread("sim-devices")

        async def make_clients():
            return [AsyncParamClient(target, device_id=d, timeout_s=timeout_s, application=application)
                    for d in self.device_ids]

        self.clients = self._loop.run(make_clients())

    def _window(self, device: int, length: int) -> np.ndarray:
        """The first `length` interactions of a device's user."""
        return self.tl.data.sequences[int(self.tl.users[device])][:length]

    def _start(self, start: str) -> None:
        self.received_bytes[:] = 0
        self.stats = NetworkStats()
        if start == "bundle":  # every device enrols over the wire: the fleet's first burst
            devices = np.arange(self.tl.n_devices)
            ok = self._calls(devices, [self._window(int(d), self.tl.warmup) for d in devices])
            if not ok.all():
                raise ParamCastError(f"{int((~ok).sum())} of {len(ok)} devices could not enrol: {self.stats.errors}")

    def request(self, devices: np.ndarray, steps: np.ndarray) -> np.ndarray:
        return self._calls(devices, [self._window(int(self.tl.device[k]), int(self.tl.t[k]) + 1) for k in steps])

    async def _call(self, device: int, window: list[int]) -> tuple[int, float, str | None]:
        """One device's request for `window`: (response bytes, seconds, error name or None)."""
        raise NotImplementedError

    def _calls(self, devices: np.ndarray, windows: list[np.ndarray]) -> np.ndarray:
        """Every device's request at once; (m,) bool: which came back with a bundle now in use."""
        async def all_calls():
            return await asyncio.gather(*(self._call(int(d), w[-self.window:].tolist())
                                          for d, w in zip(devices, windows, strict=True)))

        t0 = time.perf_counter()
        results = self._loop.run(all_calls())
        self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(devices))
        ok = np.zeros(len(devices), dtype=bool)
        for i, (nbytes, seconds, error) in enumerate(results):
            self.stats.calls += 1
            if error is not None:
                self.stats.failures += 1
                self.stats.errors[error] = self.stats.errors.get(error, 0) + 1
                continue
            self.received_bytes[int(devices[i])] += nbytes
            self.stats.latencies.append(seconds)
            self.stats.bytes += nbytes
            ok[i] = True
        return ok

    def close(self) -> None:
        async def close_all():
            await asyncio.gather(*(c.close() for c in self.clients))

        self._loop.run(close_all())
        self._loop.stop()


class NetworkSource(_Fleet):
    """A replay Source whose bundles come from a server at `target` (host:port); the devices'
    scoring stays in the replay (torch), fed the factors each device decoded.

    `bytes_per_device` and the latency statistics come from what actually crossed the wire.
    """

    def __init__(self, target: str, tl: Timelines, model_id: str, base_version: str,
                 slot_shapes: dict[str, tuple[int, int]], rank: int, window: int, encoding: str = "int8",
                 device_prefix: str = "sim", timeout_s: float = 30.0, application: str | None = None):
        super().__init__(target, tl, window, device_prefix, timeout_s, application)
        self.model_id, self.base_version, self.encoding = model_id, base_version, encoding
        D = tl.n_devices
        self.held = {slot: (np.zeros((D, d_in, rank), np.float32), np.zeros((D, rank, d_out), np.float32))
                     for slot, (d_in, d_out) in slot_shapes.items()}

    def reset(self, start: str) -> None:
        for a, b in self.held.values():
            a[:] = 0.0
            b[:] = 0.0
        self._start(start)

    def adapters(self, n: int) -> Adapters:
        return {slot: (torch.from_numpy(a[:n]), torch.from_numpy(b[:n])) for slot, (a, b) in self.held.items()}

    async def _call(self, device: int, window: list[int]) -> tuple[int, float, str | None]:
        try:
            got = await self.clients[device].generate(window, self.model_id, self.base_version,
                                                      encoding=self.encoding)
        except ParamCastError as exc:
            return 0, 0.0, type(exc).__name__
        for slot, (a, b) in got.bundle.factors.items():
            held_a, held_b = self.held[slot]
            if a.shape != held_a.shape[1:] or b.shape != held_b.shape[1:]:
                raise InvalidInput("bundle", f"slot {slot} came back as {a.shape}, {b.shape}")
            held_a[device], held_b[device] = a, b
        return got.response_bytes, got.seconds, None


class AgentSource(_Fleet):
    """A replay Source whose devices are real device agents, one per test device, all on one loop.

    Each agent runs the exported package on ONNX Runtime (the agents share one set of sessions:
    factors are graph inputs fed per call, so the graph itself holds no device's state), keeps
    its own bundle store under `root`, and requests, verifies and applies through its own client
    (`DeviceAgent.refresh_async`). The replay asks it for each step's scoring outputs (`outputs`)
    instead of scoring in torch.
    """

    def __init__(self, target: str, tl: Timelines, package: DevicePackage, window: int, encoding: str = "int8",
                 device_prefix: str = "sim", timeout_s: float = 30.0, root: str | Path | None = None,
                 application: str | None = None):
        super().__init__(target, tl, window, device_prefix, timeout_s, application)
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="paramcast-agents-")
        folder = Path(root if root is not None else self._tmp.name)  # type: ignore[union-attr]
        shared = DeviceRuntime(package)
        self.agents = [DeviceAgent(folder / str(i), package.model_id, device_id=d, encoding=encoding)
                       .open_package(package, shared.sibling()) for i, d in enumerate(self.device_ids)]
        self.enrol_behaviour: np.ndarray | None = None

    def reset(self, start: str) -> None:
        for agent in self.agents:
            agent.serve_base()
        # What each device's enrolment bundle was generated at, from its own graph (the backbone
        # does not depend on the bundle): the behaviour of its history before the last warm-up item.
        self.enrol_behaviour = np.stack([self._runtime(i).behaviour_embedding(self._window(i, self.tl.warmup - 1))
                                         for i in range(len(self.agents))])
        self._start(start)

    def adapters(self, n: int) -> None:
        return None  # the agents hold their own factors

    def outputs(self, steps: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Devices [0, n) score their step's candidates: (behaviour (n, d), user_state (n, d), scores (n, C))."""
        runs = [self._runtime(i).outputs(self._window(i, int(self.tl.t[k])), candidates[i])
                for i, k in enumerate(steps)]
        scores, user, behaviour = (np.stack(x) for x in zip(*runs, strict=True))
        return behaviour, user, scores

    def _runtime(self, device: int) -> DeviceRuntime:
        runtime = self.agents[device].runtime
        assert runtime is not None  # opened in __init__
        return runtime

    async def _call(self, device: int, window: list[int]) -> tuple[int, float, str | None]:
        outcome: Refresh = await self.agents[device].refresh_async(self.clients[device], window)
        return outcome.response_bytes, outcome.seconds, None if outcome.applied else outcome.outcome

    def close(self) -> None:
        super().close()
        if self._tmp is not None:
            self._tmp.cleanup()

"""The chaos run: device processes with agents against `paramcast serve`, with faults injected on
both sides, then a check of every device's state.

    report = run_chaos(ChaosConfig(model_dir=Path("runs/tiny"), workdir=Path("/tmp/chaos")))
    report.problems   # [] when every device ended as it should

What happens, on loopback only (the server binds 127.0.0.1, port 0 then the same port again):

1. A server with per-device tokens and a download byte rate (so every package download is a
   throttled stream, cut by RESOURCE_EXHAUSTED and resumed several times) starts, and `devices`
   device processes start downloading. Device 0 kills itself mid-download (`--die-at-byte`) and
   is restarted; device 1 kills itself mid-way through a bundle write (`--die-at-save`) later.
2. While the downloads run, the server is killed with SIGKILL (the throttled streams are cut) and
   restarted on the same port.
3. Devices refresh in a loop; each is killed with SIGKILL at a random moment `device_kills` times
   and restarted. The server is killed and restarted `server_restarts - 1` more times.
4. A bad-input load (`bad_input_load`) runs against the server; its resident memory is read
   before (after a warm-up round of the same load) and after.
5. Everything stops; each device's state is opened offline and checked: a verified bundle or the
   base model, nothing refused, no temporary or partial file left once it has started, the
   package byte-identical to the server's, and no bundle lost (the one held is the last one the
   journal recorded as applied, or a newer one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from paramcast.common.package import MANIFEST_FILE, DevicePackage
from paramcast.device.agent import DeviceAgent
from paramcast.reliability.device_worker import temporaries
from paramcast.serve_process import ServeProcess
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
RECONNECT_GRACE_S = 3.0  # after a restart, calls may still fail until clients have reconnected


@dataclass
class ChaosConfig:
    model_dir: Path  # a `paramcast train` directory with its package in model_dir/package
    workdir: Path
    devices: int = 3
    server_restarts: int = 2  # SIGKILL + restart of the server, the first one mid-download
    device_kills: int = 1  # random SIGKILLs per device during the refresh phase
    refresh_seconds: float = 8.0  # how long devices refresh between faults
    download_seconds: float = 4.0  # about how long one package download takes under the byte rate
    bad_requests: int = 1500
    seed: int = 0
    log: Callable[[str], None] = print


@dataclass
class ChaosReport:
    faults_injected: Counter = field(default_factory=Counter)
    refreshes: Counter = field(default_factory=Counter)  # outcome -> count, over every device
    calls_failed_after_retries: int = 0  # refreshes and start-up downloads that failed after their retries
    calls_failed_while_server_up: int = 0  # of those, outside the windows where the server was down
    bundles_lost: int = 0
    stray_temporaries: list[str] = field(default_factory=list)
    temporaries_swept: int = 0  # debris of killed writers found when a device started, and removed
    server_errors: list[str] = field(default_factory=list)  # ERROR lines and tracebacks in the server logs
    packages_identical: int = 0
    devices_with_bundle: int = 0
    rss_kib: dict[str, int] = field(default_factory=dict)
    rss_growth_bad_input: float = 0.0
    bad_input_codes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "faults_injected": sum(self.faults_injected.values()),
            "faults_by_kind": dict(sorted(self.faults_injected.items())),
            "refresh_outcomes": dict(sorted(self.refreshes.items())),
            "calls_failed_after_retries": self.calls_failed_after_retries,
            "calls_failed_while_server_up": self.calls_failed_while_server_up,
            "reconnect_grace_s": RECONNECT_GRACE_S,
            "bundles_lost": self.bundles_lost,
            "stray_temporaries": len(self.stray_temporaries),
            "temporaries_swept": self.temporaries_swept,
            "server_errors": len(self.server_errors),
            "packages_identical": self.packages_identical,
            "devices_with_bundle": self.devices_with_bundle,
            "rss_kib": self.rss_kib,
            "rss_growth_bad_input": round(self.rss_growth_bad_input, 4),
            "bad_input_codes": dict(sorted(self.bad_input_codes.items())),
            "seconds": round(self.seconds, 1),
            "problems": self.problems,
        }


class Device:
    """One device process and its journal; restarted with the same state directory."""

    def __init__(self, index: int, workdir: Path, target: str, model_id: str, token: str, seed: int):
        self.index, self.device_id, self.token = index, f"dev-{index}", token
        self.root = workdir / "devices" / self.device_id
        self.journal = workdir / "journals" / f"{self.device_id}.jsonl"
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.target, self.model_id, self.seed = target, model_id, seed
        self.life = -1
        self.proc: subprocess.Popen | None = None

    def start(self, *fault: str) -> None:
        self.life += 1
        cmd = [sys.executable, "-m", "paramcast.reliability.device_worker", "--root", str(self.root),
               "--target", self.target, "--model-id", self.model_id, "--device-id", self.device_id,
               "--token", self.token, "--journal", str(self.journal), "--life", str(self.life),
               "--seed", str(self.seed), *fault]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    @staticmethod
    def _drain(proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for _ in proc.stderr:  # keep the pipe from filling; the journal is what counts
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def dump_stacks(self) -> None:
        """Have the process write its threads' stacks to its log (device_worker registers SIGUSR1)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def events(self) -> list[dict]:
        if not self.journal.exists():
            return []
        out = []
        for line in self.journal.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
        return out

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(predicate(e) for e in self.events()):
                return True
            time.sleep(0.1)
        return False


class Server:
    """`paramcast serve` that can be killed and restarted on the same port; records when it was down."""

    def __init__(self, model_dir: Path, tokens: Path, download_rate: int):
        self.args = ["--model", str(model_dir), "--host", "127.0.0.1", "--threads", "1", "--tokens", str(tokens),
                     "--download-rate", str(download_rate), "--download-burst", str(64 * 1024), "--max-delay-ms", "2"]
        self.port = 0  # the first start lets the OS pick; restarts take the same port again
        self.down: list[tuple[float, float]] = []  # (killed at, ready again at), time.time()
        self.logs: list[str] = []  # output of the servers that ran before the current one
        self.proc = self._start()

    def _start(self) -> ServeProcess:
        proc = ServeProcess([*self.args, "--port", str(self.port)])
        self.port = proc.port
        return proc

    def kill_and_restart(self, pause_s: float = 1.0) -> None:
        killed = time.time()
        self.proc.kill()
        time.sleep(pause_s)  # (also lets the output reader reach the end of the killed server's output)
        self.logs.append(self.proc.output)
        self.proc = self._start()
        self.down.append((killed, time.time()))

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def rss_kib(self) -> int:
        return self.proc.rss_bytes() // 1024

    def was_down(self, t: float) -> bool:
        return any(start <= t <= end + RECONNECT_GRACE_S for start, end in self.down)

    def stop(self) -> None:
        self.proc.stop()
        time.sleep(0.2)
        self.logs.append(self.proc.output)

    def errors(self) -> list[str]:
        lines = "\n".join(self.logs).splitlines()
        return [line for line in lines if " ERROR " in line or "Traceback" in line or line.startswith("ERROR")]


def bad_input_load(target: str, model_id: str, base_version: str, token: str, n: int, seed: int = 0) -> Counter:
    """`n` hostile or malformed calls, round robin over the kinds below -> status code name -> count.
    Every call must get an answer (a status), none may take the server down."""
    rng = random.Random(seed)
    auth = (("authorization", f"Bearer {token}"),)
    ok = dict(model_id=model_id, base_version=base_version, device_id="dev-0", window=[1, 2, 3])

    def generate(stub, fields=None, metadata=auth, timeout=5.0):
        stub.Generate(pb.GenerateRequest(**{**ok, **(fields or {})}), metadata=metadata, timeout=timeout)

    def get_model(stub, fields=None, metadata=auth, abandon=False):
        stream = stub.GetModel(pb.GetModelRequest(model_id=model_id, **(fields or {})), metadata=metadata, timeout=5)
        for _ in stream:
            if abandon:
                stream.cancel()
                break

    kinds: list[Callable] = [
        lambda stub, raw: raw(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))), metadata=auth,
                              timeout=5),  # garbage bytes
        lambda stub, raw: raw(b"\x0a\xff\xff\xff\xff", metadata=auth, timeout=5),  # a length running off the end
        lambda stub, raw: generate(stub, metadata=()),  # no credentials
        lambda stub, raw: generate(stub, metadata=(("authorization", "Bearer " + "x" * 4000),)),  # a huge token
        lambda stub, raw: generate(stub, {"device_id": f"fresh-{rng.getrandbits(32)}"}),  # another device's id
        lambda stub, raw: generate(stub, {"window": [rng.choice([0, -1, 2**62, -(2**63)])]}),  # ids out of range
        lambda stub, raw: generate(stub, {"window": [1] * 6000}),  # a window far too long
        lambda stub, raw: generate(stub, {"model_id": "../../etc/passwd"}),  # a path-like model id
        lambda stub, raw: generate(stub, {"keep_ratio": float("nan")}),
        lambda stub, raw: generate(stub, {"base_version": "0" * 16}),  # a base version not served
        lambda stub, raw: generate(stub, timeout=0.0005),  # a deadline that passes at once
        lambda stub, raw: get_model(stub, {"offset": 2**62}),
        lambda stub, raw: get_model(stub, {"version": "nope"}),
        lambda stub, raw: get_model(stub, abandon=True),  # a stream abandoned after its first chunk
    ]
    codes: Counter = Counter()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ParamServiceStub(channel)
        raw = channel.unary_unary("/paramcast.v1.ParamService/Generate")
        for i in range(n):
            try:
                kinds[i % len(kinds)](stub, raw)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return codes


def _check_device(device: Device, server_package: Path, server: Server, report: ChaosReport) -> None:
    events = device.events()
    name = device.device_id
    for e in events:
        if e["event"] == "refresh":
            report.refreshes[e["outcome"]] += 1
            if e["outcome"] == "unreachable":
                report.calls_failed_after_retries += 1
                if not server.was_down(e["t"]):
                    report.calls_failed_while_server_up += 1
        elif e["event"] == "open_failed":
            report.calls_failed_after_retries += 1
            if not server.was_down(e["t"]):
                report.calls_failed_while_server_up += 1
        elif e["event"] == "opened":
            report.temporaries_swept += len(e["temporaries_found"])
            if e["temporaries_left"]:
                report.stray_temporaries += [f"{name}: {t} (after start-up, life {e['life']})"
                                             for t in e["temporaries_left"]]
            if e["rejected"]:
                report.problems.append(f"{name} life {e['life']}: its store refused what it held: {e['rejected']}")
    applied = [e["bundle"] for e in events if e["event"] == "refresh" and e["outcome"] == "applied"]
    # Offline, as the device would start with the cloud down.
    agent = DeviceAgent(device.root, device.model_id, device_id=device.device_id, token=device.token).open(None)
    held = agent.bundle.bundle_id if agent.bundle else None
    if agent.store is not None and agent.store.rejected:
        report.problems.append(f"{name}: its store refused what it held at the end: {agent.store.rejected}")
    if applied and (held is None or (held in applied and held != applied[-1])):
        report.bundles_lost += 1
        report.problems.append(f"{name}: holds {held} after applying {applied[-1]} last")
    report.devices_with_bundle += held is not None
    left = temporaries(device.root) + [str(p.relative_to(device.root)) for p in device.root.rglob("*.part*")]
    report.stray_temporaries += [f"{name}: {t} (at the end)" for t in left]
    assert agent.package is not None
    same = all((agent.package.path / f).read_bytes() == (server_package / f).read_bytes()
               for f in [MANIFEST_FILE, *agent.package.manifest["files"]])
    report.packages_identical += same
    if not same:
        report.problems.append(f"{name}: its package differs from the server's")


def _restart_after_own_death(device: Device, report: ChaosReport) -> None:
    """A device process that ended without being killed by the run: device 1's first life dies in
    its third bundle write on purpose; any other exit is a crash."""
    if device.index == 1 and device.life == 0:
        report.faults_injected["device_killed_mid_write"] += 1
    else:
        assert device.proc is not None
        report.problems.append(f"{device.device_id} (life {device.life}) exited by itself with "
                               f"status {device.proc.returncode}")
    device.start()


def run_chaos(config: ChaosConfig) -> ChaosReport:
    started = time.monotonic()
    rng = random.Random(config.seed)
    report = ChaosReport()
    log = config.log
    work = config.workdir
    work.mkdir(parents=True, exist_ok=True)
    package_dir = config.model_dir / "package"
    package = DevicePackage.load(package_dir)
    tokens = {f"dev-{i}": f"token-{i}-{rng.getrandbits(64):x}" for i in range(config.devices)}
    tokens_file = work / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    archive_bytes = sum((package_dir / f).stat().st_size for f in [MANIFEST_FILE, *package.manifest["files"]])
    rate = max(64 * 1024, int(archive_bytes / config.download_seconds))

    server = Server(config.model_dir, tokens_file, rate)
    devices: list[Device] = []
    try:
        target = f"127.0.0.1:{server.port}"
        log(f"server on {target}; package {archive_bytes} bytes at {rate} bytes/s per device")
        devices = [Device(i, work, target, package.model_id, tokens[f"dev-{i}"], config.seed)
                   for i in range(config.devices)]
        for device in devices:
            fault = ["--die-at-byte", str(archive_bytes // 3)] if device.index == 0 else []
            fault += ["--die-at-save", "3"] if device.index == 1 else []
            device.start(*fault)

        # The first server kill lands while the throttled downloads are under way.
        devices[-1].wait_for(lambda e: e["event"] == "download", 60)
        time.sleep(min(1.0, config.download_seconds / 3))
        server.kill_and_restart()
        report.faults_injected["server_killed_mid_download"] += 1
        log(f"server killed mid-download and restarted (pid {server.pid})")

        # Device 0 killed itself mid-download: start it again, it must resume.
        if devices[0].wait_for(lambda e: bool(e.get("dying")), 90):
            devices[0].proc.wait(timeout=30)  # type: ignore[union-attr]
            report.faults_injected["device_killed_mid_download"] += 1
            devices[0].start()
        for device in devices:
            if not device.wait_for(lambda e: e["event"] == "opened", 120):
                device.dump_stacks()
                report.problems.append(f"{device.device_id} never finished starting (its log: "
                                       f"{device.journal.with_suffix('.log')})")

        # Refreshing, with devices killed at random moments and the server killed again.
        phases = max(config.device_kills, config.server_restarts - 1)
        for phase in range(phases):
            deadline = time.monotonic() + config.refresh_seconds
            kills = {d.index: rng.uniform(0.2, 0.9) * config.refresh_seconds for d in devices}
            phase_start = time.monotonic()
            while time.monotonic() < deadline:
                for device in devices:
                    if device.died():
                        _restart_after_own_death(device, report)
                    at = kills.get(device.index)
                    if phase < config.device_kills and at is not None and time.monotonic() - phase_start >= at:
                        device.kill()
                        report.faults_injected["device_killed_at_random"] += 1
                        del kills[device.index]
                        device.start()
                time.sleep(0.05)
            if phase < config.server_restarts - 1:
                server.kill_and_restart()
                report.faults_injected["server_killed_mid_run"] += 1
                log(f"server killed mid-run and restarted (pid {server.pid})")

        # Every device must still get bundles from the restarted server.
        last_restart = server.down[-1][1] if server.down else 0.0
        for device in devices:
            if device.died():
                _restart_after_own_death(device, report)
            def applied_since_restart(e: dict) -> bool:
                return e["event"] == "refresh" and e["outcome"] == "applied" and e["t"] > last_restart

            if not device.wait_for(applied_since_restart, 60):
                report.problems.append(f"{device.device_id} applied no bundle after the last restart")

        # Bad input against the live, warm server (every device has been served by it, so its
        # first-use allocations are behind it), memory measured around the second of two rounds:
        # a leak grows with every round, a server's warm-up only once.
        warmup = config.bad_requests
        report.bad_input_codes.update(bad_input_load(target, package.model_id, package.base_version,
                                                     tokens["dev-0"], warmup, config.seed))
        before = server.rss_kib()
        report.bad_input_codes.update(bad_input_load(target, package.model_id, package.base_version,
                                                     tokens["dev-0"], config.bad_requests, config.seed + 1))
        after = server.rss_kib()
        report.rss_kib = {"before": before, "after": after}
        report.rss_growth_bad_input = (after - before) / before
        report.faults_injected["bad_requests"] += warmup + config.bad_requests
        log(f"bad-input load: {dict(report.bad_input_codes)}; server RSS {before} -> {after} KiB")
    finally:
        for device in devices:
            device.kill()
        server.stop()

    for device in devices:
        _check_device(device, package_dir, server, report)
    report.server_errors = server.errors()
    if report.server_errors:
        report.problems.append(f"the server logged errors: {report.server_errors[:3]}")
    resumed = [e for e in devices[0].events() if e["event"] == "download" and e["life"] == 1 and "first_offset" in e]
    if report.faults_injected["device_killed_mid_download"] and not (resumed and resumed[0]["first_offset"] > 0):
        report.problems.append("dev-0 did not resume its download after being killed mid-way")
    if report.stray_temporaries:
        report.problems.append(f"{len(report.stray_temporaries)} stray temporaries: {report.stray_temporaries[:5]}")
    report.seconds = time.monotonic() - started
    return report

"""Scale-out benchmark: the service on Ray Serve replicas, the simulation on Ray actors, DDP training.

    python tools/bench_scale.py                  # about ten minutes on two cores

Writes benchmarks/results/scale-out.json. In one invocation, so every ratio compares numbers
taken on the same machine minutes apart:

1. Generate throughput at concurrency 64 (the service benchmark's closed loop: grpc.aio callers,
   each sending its next request when its answer arrives): `paramcast serve` with one torch thread
   (`plain_bundles_per_s`), and the Ray Serve application with 1 and 2 replicas of one CPU and one
   thread each on a local cluster (`ray_bundles_per_s`). Same model, same requests, same batching;
   the three are measured in turn for `--rounds` rounds and each figure is its median round.
2. A replica killed mid-run: 32 device clients (the device client and its default retry policy)
   call the 2-replica application while one replica is killed with `ray.kill`;
   `replica_kill_failed_calls` counts the calls that failed after the client's retries. The same
   kill with gRPC retries switched off shows how many calls the replica took with it
   (`replica_kill_failed_calls_without_retries`).
3. The simulation on MovieLens 100K devices cut into shards: in-process, and on 1 and 2 Ray
   workers (one thread each), in turn for `--rounds` rounds; `ray_sim_identical` says whether
   every Ray report equals the in-process one (timings aside), `ray_sim_device_steps_per_s` is the
   median device-steps per second. The same devices replayed in-process as one fleet show what
   cutting them into shards costs.
4. Training (both stages, `paramcast train`'s default architecture, a fixed number of epochs) with
   `torchrun --nproc-per-node 1` and `2`, one thread per process: `ddp_epoch_seconds` is the mean
   static-stage epoch (validation included), `ddp_quality_delta` the paired test NDCG@10
   difference (2 processes minus 1) over users with its 95% bootstrap CI.

Everything shares this machine's cores - the load generator, Ray's proxy and control plane, the
replicas, the workers - so on 2 cores a second replica or worker cannot double anything: the
ratios are bounded by the cores, not by Ray. The JSON records the core count and the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from paramcast.bench_service import closed_loop, make_requests, quick_model
from paramcast.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "scale-out.json"


# ---------------------------------------------------------------------------------------------
# 1-2: the service
# ---------------------------------------------------------------------------------------------


def _median_row(rows: list[dict]) -> dict:
    """The round with the median throughput, and every round's throughput beside it."""
    ranked = sorted(rows, key=lambda r: r["throughput_per_s"])
    return {**ranked[len(ranked) // 2], "rounds_per_s": [r["throughput_per_s"] for r in rows]}


def service_throughput(model: Path, requests: list[bytes], args, port: int) -> tuple[dict, dict[str, dict]]:
    """Rounds of (plain server, 1 Ray replica, 2 Ray replicas), taken in turn so the three see the
    same background load -> (plain, {replicas: row}), each the median round."""
    from paramcast.cloud.service import ray_serve
    from paramcast.cloud.service.core import Limits

    config = ray_serve.ServiceConfig(models=(str(model),), threads=1,
                                     limits=Limits(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                                                   max_queue=100000))
    plain_server = ServeProcess(["--model", str(model), "--port", "0", "--threads", "1", "--max-batch",
                                 str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms), "--max-queue",
                                 "100000"], timeout_s=300.0)
    rows: dict[str, list[dict]] = {"plain": [], "1": [], "2": []}
    try:
        for _ in range(args.rounds):
            rows["plain"].append(asyncio.run(closed_loop(plain_server.port, requests, args.concurrency, args.seconds,
                                                         args.warmup)))
            print(f"plain: {rows['plain'][-1]['throughput_per_s']:.0f}/s", flush=True)
            for replicas in ("1", "2"):
                ray_serve.deploy(config, ray_serve.Scaling(replicas=int(replicas), cpus_per_replica=1.0, grace_s=2),
                                 port=port)
                rows[replicas].append(asyncio.run(closed_loop(port, requests, args.concurrency, args.seconds,
                                                              args.warmup)))
                print(f"ray {replicas} replica(s): {rows[replicas][-1]['throughput_per_s']:.0f}/s", flush=True)
    finally:
        plain_server.stop()
    return _median_row(rows["plain"]), {k: _median_row(rows[k]) for k in ("1", "2")}  # 2 replicas stay deployed


def _replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::paramcast#ParamService#"))


def _replaced(n: int, gone: str) -> bool:
    """True once `n` replicas run again and `gone` is not among them."""
    from ray import serve

    state = serve.status().applications["paramcast"].deployments["ParamService"]
    names = _replicas()
    running = sum(count for name, count in state.replica_states.items() if name == "RUNNING")
    return len(names) == n and gone not in names and running == n


def replica_kill(model_info: dict, windows: list[list[int]], port: int, retries: bool, seconds: float = 12.0,
                 kill_at: float = 4.0) -> dict:
    """Device clients calling the 2-replica application while one replica is killed."""
    import grpc
    import ray

    from paramcast.common.errors import ParamCastError
    from paramcast.device.client import AsyncParamClient
    from paramcast.v1 import param_service_pb2 as pb

    before = _replicas()
    stats: dict = {"ok": 0, "failed": 0, "errors": {}, "in_flight_at_kill": 0}

    async def main() -> None:
        client = AsyncParamClient(f"127.0.0.1:{port}", timeout_s=30) if retries else None
        channel = None if retries else grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                                 options=[("grpc.enable_retries", 0)])
        generate = None if retries else channel.unary_unary(  # type: ignore[union-attr]
            "/paramcast.v1.ParamService/Generate")
        in_flight = 0
        stop = time.monotonic() + seconds

        async def device(i: int) -> None:
            nonlocal in_flight
            j = i
            while time.monotonic() < stop:
                window = windows[j % len(windows)]
                j += 32
                in_flight += 1
                try:
                    if client is not None:
                        await client.generate(window, model_info["model_id"], model_info["base_version"],
                                              device_id=f"kill-{i}")
                    else:
                        await generate(pb.GenerateRequest(  # type: ignore[misc]
                            model_id=model_info["model_id"], base_version=model_info["base_version"],
                            device_id=f"kill-{i}", window=window).SerializeToString(), timeout=30)
                    stats["ok"] += 1
                except (ParamCastError, grpc.RpcError) as exc:
                    stats["failed"] += 1
                    name = type(exc).__name__ if isinstance(exc, ParamCastError) else exc.code().name
                    stats["errors"][name] = stats["errors"].get(name, 0) + 1
                finally:
                    in_flight -= 1

        async def kill() -> None:
            await asyncio.sleep(kill_at)
            stats["in_flight_at_kill"] = in_flight
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            while not await asyncio.to_thread(_replaced, 2, before[0]):  # polled while the load goes on
                if time.monotonic() - killed_at > 180:
                    raise RuntimeError(f"replica not replaced: {_replicas()}")
                await asyncio.sleep(0.25)
            stats["replaced_after_s"] = time.monotonic() - killed_at

        await asyncio.gather(kill(), *(device(i) for i in range(32)))
        if client is not None:
            await client.close()
        if channel is not None:
            await channel.close()

    asyncio.run(main())
    return stats


# ---------------------------------------------------------------------------------------------
# 3: the simulation
# ---------------------------------------------------------------------------------------------


def simulations(model: Path, data_dir: Path, args) -> dict:
    """Rounds of (in-process, 1 Ray worker, 2 Ray workers) on the same shards, in turn; the
    in-process run of the same devices as one fleet (the default shard size) is the reference
    for what sharding itself costs."""
    import dataclasses

    import torch

    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.common.data import load_interactions
    from paramcast.simulation.harness import SimulationConfig, simulate
    from paramcast.simulation.ray_engine import RayEngine
    from paramcast.simulation.report import without_timings
    from paramcast.simulation.shards import DEFAULT_SHARD_DEVICES, Engine, LocalEngine

    torch.set_num_threads(1)
    ckpt = load_checkpoint(model)
    data = load_interactions(data_dir)
    cfg = SimulationConfig(policies=["never", "always", "every-k", "random-p", "drift", "window", "loss", "ideal"],
                           budgets=[0.1], devices="all", users=args.sim_users, max_steps=args.sim_steps,
                           shard_devices=args.shard_devices, progress=False)
    one_fleet = dataclasses.replace(cfg, shard_devices=DEFAULT_SHARD_DEVICES)
    rates: dict[str, list[float]] = {"inprocess": [], "1": [], "2": [], "inprocess_one_shard": []}
    startup: dict[str, list[float]] = {"1": [], "2": []}
    reports: dict[str, list[dict]] = {"inprocess": [], "1": [], "2": []}
    for _ in range(args.rounds):
        for which in ("inprocess", "1", "2", "inprocess_one_shard"):
            engine: Engine
            if which.startswith("inprocess"):
                engine = LocalEngine(ckpt, cfg.encoding, threads=1)
            else:
                ray_engine = RayEngine(ckpt, int(which), cfg.encoding, threads=1)
                startup[which].append(ray_engine.startup_seconds)
                engine = ray_engine
            report = simulate(ckpt, data, one_fleet if which == "inprocess_one_shard" else cfg, engine=engine)
            rates[which].append(report["device_steps_per_s"])
            if which in reports:
                reports[which].append(without_timings(report))
            print(f"simulation {which}: {report['device_steps_per_s']:,.0f} device-steps/s", flush=True)
    reference = json.dumps(reports["inprocess"][0], sort_keys=True)
    same = all(json.dumps(r, sort_keys=True) == reference for runs in reports.values() for r in runs)
    return {
        "identical": same,
        "device_steps_per_s": {w: float(np.median(rates[w])) for w in ("1", "2")},
        "inprocess_device_steps_per_s": float(np.median(rates["inprocess"])),
        "inprocess_one_shard_device_steps_per_s": float(np.median(rates["inprocess_one_shard"])),
        "rounds_device_steps_per_s": rates,
        "worker_startup_seconds": startup,
        "devices": reports["inprocess"][0]["devices"],
        "config": {k: v for k, v in reports["inprocess"][0]["config"].items() if k != "progress"},
    }


# ---------------------------------------------------------------------------------------------
# 4: DDP training
# ---------------------------------------------------------------------------------------------


def ddp(data_dir: Path, workdir: Path, args) -> dict:
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.evaluate import per_user_metrics
    from paramcast.common.data import load_interactions
    from paramcast.common.evaluation import paired_difference

    out: dict = {"epoch_seconds": {}, "wall_seconds": {}, "commands": {}}
    ckpts = {}
    for nproc in (1, 2):
        target = workdir / f"ddp-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "paramcast.cli", "train", "--data", str(data_dir), "--out", str(target), "--device", "cpu",
               "--threads", "1", "--epochs", str(args.ddp_epochs), "--patience", str(args.ddp_epochs),
               "--gen-epochs", str(args.ddp_gen_epochs), "--gen-patience", str(args.ddp_gen_epochs),
               "--no-progress"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed:\n{done.stderr[-3000:]}")
        out["wall_seconds"][str(nproc)] = time.perf_counter() - t0
        out["commands"][str(nproc)] = "torchrun " + " ".join(cmd[3:]).replace(str(data_dir), "DATA").replace(
            str(target), "OUT")
        ckpts[nproc] = load_checkpoint(target)
        history = ckpts[nproc].meta["history"]["static"]
        out["epoch_seconds"][str(nproc)] = float(np.mean([h["seconds"] for h in history]))
        print(f"torchrun {nproc} process(es): {out['epoch_seconds'][str(nproc)]:.1f} s per static epoch", flush=True)
    data = load_interactions(data_dir)
    cold = set(ckpts[1].meta["split"]["cold_users"])
    warm = np.array([u for u, raw in enumerate(data.user_raw_ids) if raw not in cold], dtype=np.int64)
    per_user = {n: per_user_metrics(ckpts[n], data, warm, "test", ["generated"])["generated"] for n in (1, 2)}
    diff = paired_difference(per_user[2], per_user[1])
    out["quality"] = {str(n): float(np.mean(per_user[n]["ndcg@10"])) for n in (1, 2)}
    out["quality_delta"] = {"metric": "test ndcg@10, generated", "value": diff["ndcg@10"]["value"],
                            "ci": diff["ndcg@10"]["ci"], "users": int(len(per_user[1]["ndcg@10"])),
                            "within_noise": diff["ndcg@10"]["ci"][0] <= 0 <= diff["ndcg@10"]["ci"][1]}
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "ml-100k")
    p.add_argument("--model", type=Path, help="checkpoint dir (default: a quick one with the default architecture)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per throughput point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--sim-users", type=int, default=300, help="test (and validation) devices")
    p.add_argument("--sim-steps", type=int, default=80, help="steps replayed per device")
    p.add_argument("--shard-devices", type=int, default=75)
    p.add_argument("--rounds", type=int, default=3,
                   help="throughput rounds, taken in turn; each figure is the median round")
    p.add_argument("--ddp-epochs", type=int, default=20)
    p.add_argument("--ddp-gen-epochs", type=int, default=4)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from paramcast.cloud import ray_cluster

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster for this run only
    with tempfile.TemporaryDirectory(prefix="paramcast-bench-scale-") as tmp:
        workdir = Path(tmp)
        model = args.model or quick_model(workdir, args.data)
        requests, _, info = make_requests(model, args.data, 2048)
        windows = _windows(requests)

        ray_cluster.connect(num_cpus=2, object_store_bytes=200 * 1024 * 1024)
        try:
            from paramcast.cloud.service import ray_serve

            port = ray_serve.start()
            plain, ray_rows = service_throughput(model, requests, args, port)
            killed = replica_kill(info, windows, port, retries=True)
            print(f"kill with retries: {killed['failed']} failed of {killed['ok'] + killed['failed']}", flush=True)
            unretried = replica_kill(info, windows, port, retries=False)
            print(f"kill without retries: {unretried['failed']} failed", flush=True)
            ray_serve.shutdown()
            sim = simulations(model, args.data, args)
        finally:
            ray_cluster.disconnect()
        training = ddp(args.data, workdir, args)

    doc = {
        "benchmark": "scale-out",
        "plain_bundles_per_s": plain["throughput_per_s"],
        "ray_bundles_per_s": {k: r["throughput_per_s"] for k, r in ray_rows.items()},
        "replica_kill_failed_calls": killed["failed"],
        "replica_kill_failed_calls_without_retries": unretried["failed"],
        "ray_sim_identical": sim["identical"],
        "ray_sim_device_steps_per_s": sim["device_steps_per_s"],
        "ddp_epoch_seconds": training["epoch_seconds"],
        "ddp_quality_delta": training["quality_delta"],
        "service": {"plain": plain, "ray": ray_rows,
                    "replica_kill": {"with_retries": killed, "without_retries": unretried},
                    "settings": {"concurrency": args.concurrency, "seconds": args.seconds, "warmup": args.warmup,
                                 "rounds": args.rounds,
                                 "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms,
                                 "replica": "1 CPU, 1 torch thread", "plain_server": "--threads 1"},
                    "model": info},
        "simulation": sim,
        "training": training,
        "bound": "All processes share this machine's cores: on 2 cores the load generator, Ray's proxy and "
                 "control plane and the replicas (or workers) compete, so 2 replicas or workers cannot reach "
                 "twice 1; the ratios are bounded by the cores, not by Ray.",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "seconds": time.perf_counter() - t_start,
        "command": " ".join(["python tools/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(args.out)
    return 0


def _windows(requests: list[bytes]) -> list[list[int]]:
    from paramcast.v1 import param_service_pb2 as pb

    return [list(pb.GenerateRequest.FromString(r).window) for r in requests[:256]]


if __name__ == "__main__":
    sys.exit(main())

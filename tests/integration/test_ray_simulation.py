"""The simulation with its device shards on Ray actors of a real local cluster: for a seed the
report is the in-process one, whatever the number of workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paramcast.cloud.checkpoint import load_checkpoint
from paramcast.common.data import load_interactions
from paramcast.simulation.harness import SimulationConfig, simulate
from paramcast.simulation.report import without_timings
from paramcast.simulation.shards import LocalEngine

POLICIES = ["never", "always", "every-k", "random-p", "drift", "window", "loss", "ideal"]


def test_ray_workers_give_the_in_process_report(ray_cluster, trained_model, shared_data):
    from paramcast.simulation.ray_engine import RayEngine

    ckpt = load_checkpoint(trained_model)
    data = load_interactions(shared_data / "ml-100k")
    cfg = SimulationConfig(policies=POLICIES, budgets=[0.2], users=30, max_steps=25, devices="all",
                           shard_devices=8, progress=False)
    local = simulate(ckpt, data, cfg, engine=LocalEngine(ckpt, cfg.encoding, threads=1))
    assert local["devices"]["shards"] == {"test": 4, "validation": 4}
    for workers in (1, 3):
        remote = simulate(ckpt, data, cfg, engine=RayEngine(ckpt, workers, cfg.encoding, threads=1,
                                                            cpus_per_worker=0.5))
        assert remote["throughput"]["engine"] == {"name": "ray", "workers": workers}
        assert json.dumps(without_timings(remote), sort_keys=True) == json.dumps(without_timings(local),
                                                                                 sort_keys=True)


def test_network_mode_on_ray_workers_sends_every_request_over_the_wire(ray_cluster, trained_model, shared_data):
    """Each worker's devices are gRPC clients of the server; decisions and quality match the
    in-process engine's network run (the server batches differently, which may move a float's
    last bit)."""
    from paramcast.simulation.harness import run_simulation
    from paramcast.simulation.ray_engine import RayEngine

    ckpt = load_checkpoint(trained_model)
    data = load_interactions(shared_data / "ml-100k")
    cfg = SimulationConfig(policies=["never", "always", "random-p:0.2"], users=12, max_steps=10, devices="all",
                           shard_devices=4, progress=False)
    local = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(trained_model)).report
    remote = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(trained_model),
                            engine=RayEngine(ckpt, 2, cfg.encoding, threads=1, cpus_per_worker=0.5)).report
    assert remote["mode"] == "network" and remote["devices"]["shards"]["test"] == 3
    for a, b in zip(local["policies"], remote["policies"], strict=True):
        assert b["request_rate"] == a["request_rate"]
        assert b["ndcg@10"]["value"] == pytest.approx(a["ndcg@10"]["value"], abs=2e-3)
        assert b["network"]["calls"] == a["network"]["calls"] > 0 and b["network"]["failures"] == 0
        assert b["bytes_per_device"] == pytest.approx(a["bytes_per_device"])


def test_simulate_command_with_the_ray_engine(trained_model, shared_data, tmp_path, capsys):
    """`paramcast simulate --engine ray` (a child process, so it starts a cluster of its own and
    stops it) writes the report `paramcast simulate` writes in-process."""
    pytest.importorskip("ray", reason="needs the ray extra")
    from paramcast.cli import main

    common = ["simulate", "--model", str(trained_model), "--data", str(shared_data / "ml-100k"), "--policy",
              "never", "always", "random-p", "drift", "--budget", "0.2", "--users", "16", "--max-steps", "15",
              "--devices", "all", "--shard-devices", "6", "--threads", "1", "--no-progress", "--json"]
    assert main(common) == 0
    local = json.loads(capsys.readouterr().out)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")  # a loopback cluster, like the session's
    done = subprocess.run([sys.executable, "-m", "paramcast.cli", *common, "--engine", "ray", "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads(done.stdout)
    assert remote["throughput"]["engine"] == {"name": "ray", "workers": 2}
    assert without_timings(remote) == without_timings(local)

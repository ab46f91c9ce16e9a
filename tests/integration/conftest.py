"""Fixtures for tests that run real servers: a small trained model and `paramcast serve` processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paramcast.serve_process import ServeProcess


@pytest.fixture(scope="session")
def trained_model(shared_data, tmp_path_factory) -> Path:
    """A tiny model trained on MovieLens 100K (a few seconds), saved with its device package in
    `DIR/package` (which `paramcast serve --model DIR` picks up instead of exporting again)."""
    import torch

    from paramcast.cloud.checkpoint import save_checkpoint
    from paramcast.cloud.cloud_model import CloudModelConfig
    from paramcast.cloud.export import export_package
    from paramcast.cloud.model import DeviceModelConfig
    from paramcast.cloud.train import TrainConfig, train
    from paramcast.common.data import load_interactions

    torch.set_num_threads(1)
    log = load_interactions(shared_data / "ml-100k")
    out = tmp_path_factory.mktemp("model") / "ml-100k-tiny"
    ckpt = train(
        log, str(out),
        DeviceModelConfig(n_items=log.n_items, hidden=16, head_units=16, ffn_units=16, max_len=20),
        TrainConfig(epochs=1, gen_epochs=1, progress=False, threads=1),
        {"width": 32},
        cloud_cfg=CloudModelConfig(n_items=log.n_items, hidden=16, n_blocks=1, ffn_units=16, max_len=30),
    )
    # One generator epoch may keep the zero-initialised B heads (early stopping keeps the best
    # weights, and B = 0 reproduces the static model); give them weight so every test below sees
    # deltas that really change scores.
    torch.manual_seed(0)
    with torch.no_grad():
        for head in ckpt.generator.b_heads.values():
            head.weight.normal_(0, 0.05)
    save_checkpoint(ckpt, out)
    export_package(ckpt, out / "package")
    return out


@pytest.fixture
def serve_process():
    """Start `paramcast serve` processes; every one is killed at the end of the test, whatever happened."""
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = ServeProcess(list(args))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 for the whole session (no dashboard, a small object store,
    4 logical CPUs on however many cores there are), shut down at the end. Skips without Ray."""
    pytest.importorskip("ray", reason="needs the ray extra")
    from paramcast.cloud import ray_cluster as cluster

    # Token auth protects clusters others can reach; this one is on loopback and lives for the
    # session, so it neither needs a token nor writes one into the home directory.
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster.connect(num_cpus=4, object_store_bytes=100 * 1024 * 1024)
    try:
        yield cluster
    finally:
        from ray import serve

        serve.shutdown()
        cluster.disconnect()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous

"""Fixtures for tests that run real servers: a small trained model and `paramcast serve` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from paramcast.serve_process import ServeProcess


@pytest.fixture(scope="session")
def trained_model(shared_data, tmp_path_factory) -> Path:
    """A tiny model trained on MovieLens 100K (a few seconds), saved with its device package in
    `DIR/package` (which `paramcast serve --model DIR` picks up instead of exporting again)."""
    import torch

    from paramcast.cloud.checkpoint import save_checkpoint
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
        {"window": 20, "width": 32, "n_layers": 1},
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

"""Fixtures for tests that run real servers: a small trained model and `paramcast serve` processes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


class ServeProcess:
    """`paramcast serve ...` as a child process; `port` is read from its readiness line."""

    READY = "paramcast serve ready on "

    def __init__(self, args: list[str], timeout: float = 120.0):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paramcast.cli", "serve", *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._ready: queue.Queue[str] = queue.Queue()
        # Drain the pipe in the background so the server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            line = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError("paramcast serve did not become ready:\n" + self.output) from None
        if not line:
            self.kill()
            raise RuntimeError("paramcast serve exited before it was ready:\n" + self.output)
        self.address = line[len(self.READY):].strip()
        self.port = int(self.address.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(self.READY):
                self._ready.put(line)
        self._ready.put("")  # EOF: the process ended

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


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

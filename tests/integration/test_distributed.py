"""Training with DistributedDataParallel: two gloo processes on loopback started by torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from paramcast.cloud.distributed import Context

REPO = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str], tmp_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on localhost with a port the OS picks, so parallel runs never collide.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --tee 3: each rank's own output reaches ours (prefixed with its rank), so a failure shows its cause.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--tee", "3",
                           f"--nproc-per-node={nproc}", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_world_of_one_changes_nothing():
    ctx = Context()
    rng = np.random.default_rng(0)
    step = lambda batch: batch  # noqa: E731
    assert not ctx.enabled and ctx.is_writer
    assert ctx.shared_rng(rng) is rng and ctx.rank_seed(7) == 7 and ctx.local_batch_size(128) == 128
    assert ctx.shard([3, 1, 2]) == [3, 1, 2] and ctx.data_parallel(step) is step
    assert ctx.mean(0.25) == 0.25 and ctx.means([np.array([1.0, 2.0])]) == [1.5]
    assert ctx.threads(0) == 0 and ctx.threads(3) == 3  # a single process keeps what it was given


def test_ranks_on_one_host_share_its_cores():
    two = Context(rank=1, world=4, local_rank=1, backend="gloo", local_world=2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert two.threads(0) == max(1, cores // 2) and two.threads(5) == 5


HELPERS = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    from paramcast.cloud import distributed

    ctx = distributed.context("cpu")
    out = {"rank": ctx.rank, "world": ctx.world, "backend": ctx.backend}
    rng = np.random.default_rng(100 + ctx.rank)  # ranks start from different states on purpose
    out["order"] = ctx.shared_rng(rng).permutation(10).tolist()
    out["shard"] = [int(x) for x in ctx.shard(list(range(11)))]
    out["mean"] = ctx.mean(float(ctx.rank))
    out["means"] = ctx.means([np.arange(ctx.rank + 1, dtype=float)])

    def fit(model):  # as the trainer does: the DDP wrapper lives in a function that returns before close()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.full((4, 3), float(ctx.rank + 1))
        step = ctx.data_parallel(lambda batch: (model(batch) ** 2).mean(), model)
        for _ in range(3):
            loss = step(x)
            opt.zero_grad()
            loss.backward()
            opt.step()

    # DDP: each rank fits a different batch, yet after the steps both hold the same weights
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    start = model.weight.detach().clone()
    fit(model)
    ctx.check_in_sync(model)
    out["moved"] = bool((model.weight.detach() != start).any())
    out["weight"] = model.weight.detach().flatten().tolist()
    with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "w") as f:
        json.dump(out, f)
    ctx.close()
""")


def test_helpers_agree_across_two_processes(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    done = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"], r0["backend"]) == (2, 2, "gloo")
    assert r0["order"] == r1["order"]  # one shuffle for every rank, although their own generators differ
    assert r0["shard"] == [0, 2, 4, 6, 8] and r1["shard"] == [1, 3, 5, 7, 9]  # disjoint, equal counts
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["means"] == r1["means"] == [pytest.approx((0 + 0 + 1) / 3)]  # over all samples, not per rank
    assert r0["moved"] and r0["weight"] == r1["weight"]  # gradients were averaged, not kept per rank


def test_torchrun_trains_every_stage_with_two_processes(shared_data, tmp_path):
    out = tmp_path / "model"
    done = _torchrun(["-m", "paramcast.cli", "train", "--data", str(shared_data / "ml-100k"), "--out", str(out),
                      "--device", "cpu", "--epochs", "1", "--gen-epochs", "1", "--hidden", "16",
                      "--head-units", "16", "--ffn-units", "16", "--max-len", "20", "--window", "20",
                      "--cloud-hidden", "16", "--cloud-blocks", "1", "--cloud-ffn-units", "16",
                      "--gen-width", "32", "--valid-users", "100", "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Only rank 0 wrote: one bundle, one summary on stdout.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "checkpoint.pt"]
    printed = re.sub(r"(?m)^\[[^\]]+\]:", "", done.stdout)  # --tee prefixes every line with its rank
    summary = json.loads(printed[printed.index("{"):])
    assert printed.count('"model_id"') == 1
    meta = json.loads((out / "checkpoint.json").read_text())["meta"]
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}  # and the ranks ended in sync
    assert [len(meta["history"][stage]) for stage in ("static", "cloud", "generator")] == [1, 1, 1]

    from paramcast.cloud.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)
    assert ckpt.base_version == summary["base_version"] and ckpt.generator is not None

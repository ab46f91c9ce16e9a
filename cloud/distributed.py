"""Data-parallel training over processes and hosts: torch DistributedDataParallel under `torchrun`.

    torchrun --standalone --nproc-per-node 2 -m paramcast.cli train --data D --out runs/x      # one host
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
             --nproc-per-node 8 -m paramcast.cli train --data D --out runs/x                     # two hosts

`torchrun` starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address; `context()` reads them and joins the process group: NCCL when the process trains on CUDA
(one GPU per local rank), gloo on CPU. Without those variables (a plain `paramcast train`) the
context is a world of one and every helper below is the identity, so single-process training is
exactly what it was.

What a world of N changes, in both stages:
- the batch size stays the global one: each rank takes batch_size / N samples per step, and DDP
  averages the gradients over ranks during backward, so a step sees the same number of samples;
- every rank shuffles with the same seed (drawn on rank 0 and broadcast), then rank r keeps every
  N-th batch of that order, so ranks never train on the same batch within an epoch;
- validation users are split across ranks and the metric sums all-reduced: every rank gets the
  same validation score, so early stopping stops all of them at the same epoch;
- per-step randomness (masks, cuts, negatives) is seeded per rank;
- without `--threads`, each rank takes its share of the host's cores, not all of them;
- only rank 0 shows progress and writes the model bundle; the others check their weights equal
  rank 0's before exiting (`check_in_sync`).
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank, world size, local rank, collective backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed
    local_world: int = 1  # ranks on this host

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files and shows progress."""
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend}

    # -- devices and seeds ----------------------------------------------------------------------
    def torch_device(self, device: torch.device) -> torch.device:
        """The rank's own GPU (cuda:LOCAL_RANK) when training on CUDA; the device unchanged otherwise."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def threads(self, threads: int) -> int:
        """Torch threads for this rank when `threads` (0 = every core) is what one process would
        take: the host's cores split between its ranks, so they do not oversubscribe them."""
        if threads or not self.enabled:
            return threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.local_world)

    def rank_seed(self, seed: int) -> int:
        """A per-rank seed for per-step randomness; rank 0 keeps `seed`."""
        return seed + self.rank

    def shared_rng(self, rng: np.random.Generator) -> np.random.Generator:
        """A generator every rank draws identically from: `rng` itself in a world of one; otherwise
        seeded from a number rank 0 draws from its `rng` and broadcasts."""
        if not self.enabled:
            return rng
        seed = self._tensor([float(rng.integers(0, 2**31 - 1))])
        dist.broadcast(seed, src=0)
        return np.random.default_rng(int(seed.item()))

    # -- data -----------------------------------------------------------------------------------
    def local_batch_size(self, batch_size: int) -> int:
        """The share of a global batch one rank trains on."""
        if batch_size < self.world:
            raise ValueError(f"batch size {batch_size} is smaller than the world size {self.world}")
        return batch_size // self.world

    def shard(self, items: Sequence[Any] | np.ndarray) -> list:
        """Every world-th item starting at this rank; the tail that would leave ranks with unequal
        counts is dropped (DDP needs every rank to take the same number of steps)."""
        if not self.enabled:
            return list(items)
        usable = len(items) // self.world * self.world
        return list(items[self.rank:usable:self.world])

    # -- training -------------------------------------------------------------------------------
    def data_parallel(self, step: Callable[[Any], torch.Tensor], *modules: torch.nn.Module,
                      sometimes_unused: bool = False) -> Callable[[Any], torch.Tensor]:
        """`step(batch) -> loss` run through DistributedDataParallel over the parameters of
        `modules` that require gradients: backward then averages their gradients across ranks.
        `sometimes_unused`: some steps leave parameters out of the loss (the generator's mask
        heads when a batch is not slimmed), which DDP must look for after every forward."""
        if not self.enabled:
            return step
        wrapper = _StepModule(step, modules)
        on_cuda = next(wrapper.parameters()).is_cuda
        return torch.nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[self.local_rank] if on_cuda else None, find_unused_parameters=sometimes_unused)

    def mean(self, value: float) -> float:
        """The mean of a per-rank number (e.g. an epoch's training loss) over ranks."""
        if not self.enabled:
            return value
        t = self._tensor([value])
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def means(self, values: Sequence[np.ndarray]) -> list[float]:
        """For each array of per-sample values held in shards across ranks, the mean over all samples."""
        if not self.enabled:
            return [float(np.mean(v)) for v in values]
        t = self._tensor([x for v in values for x in (float(np.sum(v, dtype=np.float64)), float(len(v)))])
        dist.all_reduce(t)
        sums = t.view(-1, 2).cpu().numpy()
        return [float(s / max(n, 1.0)) for s, n in sums]

    def check_in_sync(self, *modules: torch.nn.Module) -> None:
        """Raise unless every rank holds the same weights (DDP keeps them equal; this proves it)."""
        if not self.enabled:
            return
        h = hashlib.sha256()
        for m in modules:
            for name, tensor in sorted(m.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        mine = self._tensor([float(int(h.hexdigest()[:12], 16))])
        theirs = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(theirs, mine)
        if any(int(t.item()) != int(mine.item()) for t in theirs):
            raise RuntimeError(f"rank {self.rank}: weights differ between ranks after training")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together (a rank tearing down while another still talks aborts).
        DDP wrappers hold the group through reference cycles (their hooks), so a plain return does
        not free them: collect them first, while the group they tear down with is still alive,
        rather than at interpreter exit after it is gone."""
        if self.enabled and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)


class _StepModule(torch.nn.Module):
    """Puts a training step behind forward(), where DDP hooks its gradient all-reduce."""

    def __init__(self, step: Callable[[Any], torch.Tensor], modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)  # registered so DDP finds (and syncs) their parameters
        self.step = step

    def forward(self, batch: Any) -> torch.Tensor:
        return self.step(batch)


_CONTEXT: Context | None = None


def context(device: str = "auto") -> Context:
    """This process's context, read from torchrun's environment once per process (joining the
    process group the first time). `device` is the training device flag: NCCL needs CUDA."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = Context()
        return _CONTEXT
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    on_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    _CONTEXT = Context(rank, world, local_rank, backend, local_world)
    return _CONTEXT

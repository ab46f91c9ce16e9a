"""Everything a replay needs from the models, computed once per set of timelines and shared by
every policy: the device model's behaviour embedding at every step, and the bundle the generator
would return for a request at every step (after the wire encoding, as the device decodes it).

Why this is exact: adapters only touch the head, which reads the backbone's last state - the
`behaviour` output of the device graph - so the backbone runs once per step whatever bundle a
device holds, and a policy's replay only re-runs the head and the dot products. Bundles are
deterministic functions of the window (the generator runs in eval mode), so the bundle a request
at step k gets is the same for every policy. Slimming masks change the backbone and are not
simulated here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from paramcast.cloud.bundles import generate_bundles, generate_parameters
from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.model import Adapters, DeviceModel, left_pad
from paramcast.common.bundle import check_encoding, dequantize, quantize
from paramcast.common.serde import encode_bundle
from paramcast.simulation.timelines import Timelines


class FactorTable:
    """Generated factors as a device decodes them from the wire, one row per bundle.

    Row 0 is the base model (zero-rank-equivalent: all factors zero). int8 rows are kept as the
    wire carries them (int8 values + one float32 scale per row of each factor), so a table of a
    few hundred thousand bundles stays small; fp16 and fp32 rows are kept decoded.
    """

    def __init__(self, slot_shapes: dict[str, tuple[int, int]], rank: int, n_rows: int, encoding: str):
        dtype = check_encoding(encoding).stored_as
        self.encoding, self.rank = encoding, rank
        self.shapes = {slot: ((d_in, rank), (rank, d_out)) for slot, (d_in, d_out) in slot_shapes.items()}
        self.values: dict[str, list[np.ndarray]] = {}
        self.scales: dict[str, list[np.ndarray]] = {}
        for slot, shapes in self.shapes.items():
            self.values[slot] = [np.zeros((n_rows, *s), dtype=dtype) for s in shapes]
            self.scales[slot] = [np.zeros((n_rows, s[0]), dtype=np.float32) for s in shapes]

    def put(self, rows: np.ndarray, adapters: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Store fp32 factors (slot -> (A (n, d_in, r), B (n, r, d_out))) at `rows`, through the codec."""
        for slot, pair in adapters.items():
            for i, x in enumerate(pair):
                n, r, c = x.shape
                # Each matrix row is quantised on its own, so stacking the rows of n matrices and
                # encoding them as one (n * r, c) tensor gives exactly the per-bundle encoding.
                enc = quantize(x.reshape(n * r, c), self.encoding)
                if self.encoding == "int8":
                    self.values[slot][i][rows] = np.frombuffer(enc.data, np.int8).reshape(n, r, c)
                    self.scales[slot][i][rows] = np.frombuffer(enc.row_scales, "<f4").reshape(n, r)
                else:
                    self.values[slot][i][rows] = dequantize(enc).reshape(n, r, c)

    def gather(self, rows: np.ndarray) -> Adapters:
        """slot -> (A (n, d_in, r), B (n, r, d_out)) float32 torch tensors for `rows`."""
        out = {}
        for slot in self.shapes:
            pair = []
            for values, scales in zip(self.values[slot], self.scales[slot], strict=True):
                v = values[rows].astype(np.float32)
                if self.encoding == "int8":
                    v *= scales[rows][:, :, None]  # what common.bundle.dequantize computes
                pair.append(torch.from_numpy(v))
            out[slot] = (pair[0], pair[1])
        return out

    def row(self, index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """One row's decoded factors as numpy (A (d_in, r), B (r, d_out))."""
        return {slot: (a[0].numpy(), b[0].numpy()) for slot, (a, b) in self.gather(np.array([index])).items()}


@dataclass
class StepCache:
    """Per-step model outputs for one set of timelines.

    Bundle rows: 0 = base model, 1 + i = device i's enrolment bundle (window seq[:warmup]),
    1 + D + k = the bundle a request right after step k gets (window seq[:t_k + 1]).
    """

    behaviour: np.ndarray  # (N, d) backbone state of each step's history
    enrol_behaviour: np.ndarray  # (D, d) backbone state of seq[:warmup - 1], when enrolling
    table: FactorTable | None  # None when the model has no generator (only `never` on the base model)
    item_emb: np.ndarray  # (n_items + 1, d)
    bundle_bytes: int  # wire size of one encoded bundle (GenerateResponse payload)
    seconds: dict = field(default_factory=dict)

    def enrol_row(self, devices: np.ndarray) -> np.ndarray:
        return 1 + devices

    def fresh_row(self, steps: np.ndarray, n_devices: int) -> np.ndarray:
        return 1 + n_devices + steps


class Scorer:
    """The device model's head and candidate scoring on cached behaviour embeddings, batched over
    devices that each hold their own factors (what the exported graph computes, in torch)."""

    def __init__(self, model: DeviceModel):
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, behaviour: np.ndarray, adapters: Adapters | None,
                 candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """behaviour (n, d), per-device factors, candidates (n, C) -> (user_state (n, d), scores (n, C))."""
        scores, user = self.model.score_behaviour(torch.from_numpy(behaviour), torch.from_numpy(candidates), adapters)
        return user.numpy(), scores.numpy()


@torch.inference_mode()
def behaviour_embeddings(model: DeviceModel, histories: list[np.ndarray], batch: int = 512,
                         desc: str = "behaviour", progress: bool = True) -> np.ndarray:
    """(len(histories), d) last backbone state of each history, batched by length (trimmed padding)."""
    model.eval()
    out = np.empty((len(histories), model.cfg.hidden), dtype=np.float32)
    order = np.argsort([len(h) for h in histories], kind="stable")
    for lo in tqdm(range(0, len(order), batch), desc=desc, disable=not progress, leave=False):
        rows = order[lo:lo + batch]
        seq = left_pad([histories[i] for i in rows], model.cfg.max_len, trim=True)  # (B, T)
        out[rows] = model.encode(seq)[:, -1, :].numpy()
    return out


def generate_into(ckpt: Checkpoint, table: FactorTable, rows: np.ndarray, windows: list[np.ndarray],
                  batch: int = 256, desc: str = "generate", progress: bool = True) -> None:
    """Run the generator over `windows` in batches and store the encoded factors at `rows`."""
    for lo in tqdm(range(0, len(windows), batch), desc=desc, disable=not progress, leave=False):
        adapters, _ = generate_parameters(ckpt, windows[lo:lo + batch])
        table.put(rows[lo:lo + batch], {s: (a.numpy(), b.numpy()) for s, (a, b) in adapters.items()})


def precompute(ckpt: Checkpoint, tl: Timelines, encoding: str = "int8", progress: bool = True,
               bundles: bool = True) -> StepCache:
    """Behaviour embeddings and generated bundles for every step of `tl` (see StepCache).

    `bundles=False` skips the generator (the devices will get their bundles over the network)."""
    model = ckpt.device_model.eval()
    seqs, users = tl.data.sequences, tl.users
    t0 = time.perf_counter()
    histories = [seqs[int(users[tl.device[k]])][: int(tl.t[k])] for k in range(tl.n_steps)]
    behaviour = behaviour_embeddings(model, histories, progress=progress)
    enrol_behaviour = behaviour_embeddings(model, [seqs[int(u)][: tl.warmup - 1] for u in users],
                                           desc="enrolment", progress=progress)
    t1 = time.perf_counter()
    table, bundle_bytes = None, 0
    if ckpt.generator is not None and bundles:
        gen_cfg = ckpt.generator.cfg
        table = FactorTable(gen_cfg.slot_shapes, gen_cfg.rank, 1 + tl.n_devices + tl.n_steps, encoding)
        enrol = [seqs[int(u)][: tl.warmup] for u in users]
        generate_into(ckpt, table, 1 + np.arange(tl.n_devices), enrol, desc="enrolment bundles",
                      progress=progress)
        windows = [seqs[int(users[tl.device[k]])][: int(tl.t[k]) + 1] for k in range(tl.n_steps)]
        generate_into(ckpt, table, 1 + tl.n_devices + np.arange(tl.n_steps), windows, progress=progress)
        # Every bundle of a model has the same slots and shapes, so one encoded bundle gives the size.
        sample = enrol[0] if enrol else np.array([1])
        bundle_bytes = len(encode_bundle(generate_bundles(ckpt, [sample])[0], encoding))
    t2 = time.perf_counter()
    return StepCache(behaviour, enrol_behaviour, table, model.item_emb.weight.detach().numpy().copy(),
                     bundle_bytes, {"behaviour": t1 - t0, "generate": t2 - t1})

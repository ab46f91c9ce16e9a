"""Fuzz the device's bundle path: mutated bundles through decode -> verify -> apply -> score.

    report = fuzz_bundles(DevicePackage.load("pkg"), n_mutants=5000, seed=0)
    report.crashes       # anything but a typed refusal, or non-finite scores: must be 0
    report.accepted_corrupt  # a byte-mutated bundle accepted although it decodes differently: must be 0

Each mutant starts from a valid bundle of the package's own layout (random factors for every slot,
masks for some unit groups, one of the three encodings, bound to `device_id`) and is damaged one
of two ways:

- bytes: bit flips, overwritten, inserted or deleted bytes, truncation, duplicated ranges, splices
  of two bundles -- what a bad disk or network does. The checksum must catch all of these: one
  that is accepted must decode to exactly the original bundle (protobuf has a few encodings of the
  same message), otherwise it is counted as accepted-but-corrupt.
- fields, resealed: a field of the decoded message is changed (shapes, dtypes, data, scales, slot
  and group names, mask sizes and bits, ids, expiry, ranks above the package's maximum) and the
  checksum recomputed, as a hostile or buggy server would send it -- what the checks behind the
  checksum and the runtime's own checks must stop.

A mutant passes when the pipeline refuses it with a typed error (IntegrityError, VersionMismatch,
InvalidInput, all naming what was wrong) or accepts it and then scores finite numbers. Anything
else -- another exception, NaN or infinite scores, a hang -- is a crash, kept with its recipe.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from paramcast.common.bundle import ENCODINGS, DeltaBundle, EncodedTensor, payload_checksum
from paramcast.common.errors import IntegrityError, InvalidInput, VersionMismatch
from paramcast.common.package import DevicePackage
from paramcast.common.serde import decode_bundle, encode_bundle
from paramcast.device.runtime import DeviceRuntime
from paramcast.device.store import verify_bundle
from paramcast.v1 import param_service_pb2 as pb

REFUSALS = (IntegrityError, VersionMismatch, InvalidInput)
_DTYPE_NAMES = {1: "fp32", 2: "fp16", 3: "int8"}


@dataclass
class FuzzReport:
    mutants: int = 0
    refused: Counter = field(default_factory=Counter)  # stage -> mutants refused there
    accepted: int = 0  # applied and scored finite numbers
    crashes: list[str] = field(default_factory=list)  # recipe and error of every crash
    accepted_corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest_mutant_s: float = 0.0

    def summary(self) -> dict:
        return {"mutants": self.mutants, "refused_by_stage": dict(sorted(self.refused.items())),
                "accepted": self.accepted, "crashes": len(self.crashes),
                "accepted_corrupt": len(self.accepted_corrupt), "crash_examples": self.crashes[:5],
                "seconds": round(self.seconds, 2), "slowest_mutant_ms": round(self.slowest_mutant_s * 1000, 2),
                "mutants_per_s": round(self.mutants / self.seconds, 1) if self.seconds else None}


def seed_bundle(package: DevicePackage, rng: np.random.Generator, device_id: str) -> DeltaBundle:
    """A valid bundle for `package`: every slot at a random rank up to its maximum, masks for a random
    subset of unit groups."""
    factors = {}
    for name, slot in package.slots.items():
        rank = int(rng.integers(1, slot.max_rank + 1))
        factors[name] = (rng.normal(0, 0.3, (slot.d_in, rank)), rng.normal(0, 0.3, (rank, slot.d_out)))
    masks = {}
    for name, group in package.unit_groups.items():
        if rng.random() < 0.3:
            keep = rng.random(group.n_units) < 0.7
            keep[int(rng.integers(group.n_units))] = True  # at least one unit kept
            masks[name] = keep
    return DeltaBundle(package.model_id, package.base_version, factors, masks, device_id=device_id)


def reseal(msg: pb.DeltaBundle) -> None:
    """Recompute msg.checksum from its fields as they stand (what a sender that means it would do)."""
    def tensor(t: pb.Tensor) -> EncodedTensor:
        return EncodedTensor(_DTYPE_NAMES.get(t.dtype, "fp32"), tuple(t.shape), t.data, t.row_scales)

    try:
        msg.checksum = payload_checksum(
            msg.bundle_id, msg.model_id, msg.base_version, msg.created_at_ms, msg.expires_at_ms,
            [(s.slot, tensor(s.a), tensor(s.b)) for s in msg.slots],
            [(m.group, m.n_units, m.bits) for m in msg.masks], msg.device_id)
    except Exception:  # fields the checksum cannot even describe (a dimension beyond int64): leave it
        pass


# -- byte mutations ------------------------------------------------------------------------------


def mutate_bytes(data: bytes, other: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(data)
    n = len(buf)
    op = str(rng.choice(["flip", "overwrite", "insert", "delete", "truncate", "duplicate", "splice"]))
    pos = int(rng.integers(0, n))
    if op == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, n))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif op == "overwrite":
        width = int(rng.integers(1, 17))
        buf[pos:pos + width] = rng.integers(0, 256, min(width, n - pos), dtype=np.uint8).tobytes()
    elif op == "insert":
        buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
    elif op == "delete":
        del buf[pos:pos + int(rng.integers(1, 33))]
    elif op == "truncate":
        del buf[pos:]
    elif op == "duplicate":
        width = int(rng.integers(1, 65))
        buf[pos:pos] = buf[pos:pos + width]
    else:  # splice: the head of one valid bundle, the tail of another
        cut = int(rng.integers(0, len(other)))
        buf = buf[:pos] + bytearray(other[cut:])
    return bytes(buf), f"bytes:{op}@{pos}"


# -- field mutations (resealed) ------------------------------------------------------------------


def _tensor_of(msg: pb.DeltaBundle, rng: np.random.Generator) -> tuple[pb.Tensor, str] | None:
    if not msg.slots:
        return None
    i = int(rng.integers(len(msg.slots)))
    which = str(rng.choice(["a", "b"]))
    return getattr(msg.slots[i], which), f"slots[{i}].{which}"


def mutate_fields(msg: pb.DeltaBundle, rng: np.random.Generator, package: DevicePackage) -> str:
    """Change one field of `msg` in place (then reseal) -> the recipe."""
    op = str(rng.choice([
        "shape", "dtype", "random_data", "special_values", "row_scales", "data_length", "slot_name", "drop_slot",
        "duplicate_slot", "rank_above_max", "mask_units", "mask_bits", "mask_group", "ids", "expiry",
    ]))
    picked = _tensor_of(msg, rng)
    if op in ("shape", "dtype", "random_data", "special_values", "row_scales", "data_length") and picked is None:
        op = "ids"
    if op == "shape" and picked is not None:
        t, where = picked
        axis = int(rng.integers(len(t.shape))) if len(t.shape) else 0
        values = [0, 1, -1, 2**31, 2**62, int(t.shape[axis]) + 1 if len(t.shape) else 3]
        if len(t.shape):
            t.shape[axis] = int(rng.choice(values))
        else:
            t.shape.append(3)
        return f"fields:shape {where}"
    if op == "dtype" and picked is not None:
        t, where = picked
        t.dtype = int(rng.choice([0, 1, 2, 3, 7]))  # type: ignore[assignment]
        return f"fields:dtype {where}={t.dtype}"
    if op == "random_data" and picked is not None:
        t, where = picked
        t.data = rng.integers(0, 256, len(t.data), dtype=np.uint8).tobytes()  # right length, any bit pattern
        return f"fields:random_data {where}"
    if op == "special_values" and picked is not None:
        t, where = picked
        if t.dtype == pb.FLOAT32 and len(t.data) >= 4:
            values = np.frombuffer(t.data, dtype="<f4").copy()
            values[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45])
            t.data = values.tobytes()
        elif t.dtype == pb.FLOAT16 and len(t.data) >= 2:
            values = np.frombuffer(t.data, dtype="<f2").copy()
            values[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, 65504.0])
            t.data = values.tobytes()
        return f"fields:special_values {where}"
    if op == "row_scales" and picked is not None:
        t, where = picked
        if t.dtype == pb.INT8_ROW_SCALED and len(t.row_scales) >= 4:
            scales = np.frombuffer(t.row_scales, dtype="<f4").copy()
            scales[int(rng.integers(scales.size))] = rng.choice([np.nan, -1.0, np.inf, 3e38])
            t.row_scales = scales.tobytes()
        else:
            t.row_scales = b"\x00\x00\x80\x7f"  # scales on a dtype that has none
        return f"fields:row_scales {where}"
    if op == "data_length" and picked is not None:
        t, where = picked
        t.data = t.data[:-1] if rng.random() < 0.5 and t.data else t.data + b"\x00"
        return f"fields:data_length {where}"
    if op == "slot_name" and msg.slots:
        msg.slots[int(rng.integers(len(msg.slots)))].slot = str(rng.choice(["", "nope", "head.up.A", "../x", "é"]))
        return "fields:slot_name"
    if op == "drop_slot" and msg.slots:
        del msg.slots[int(rng.integers(len(msg.slots)))]
        return "fields:drop_slot"
    if op == "duplicate_slot" and msg.slots:
        msg.slots.append(msg.slots[int(rng.integers(len(msg.slots)))])
        return "fields:duplicate_slot"
    if op == "rank_above_max" and msg.slots:
        s = msg.slots[int(rng.integers(len(msg.slots)))]
        spec = package.slots.get(s.slot)
        rank = (spec.max_rank if spec else 4) + int(rng.integers(1, 4))
        d, k = int(s.a.shape[0]), int(s.b.shape[1])
        a = rng.normal(0, 0.1, (d, rank)).astype("<f4")
        b = rng.normal(0, 0.1, (rank, k)).astype("<f4")
        s.a.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[d, rank], data=a.tobytes()))
        s.b.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[rank, k], data=b.tobytes()))
        return "fields:rank_above_max"
    if op == "mask_units" and msg.masks:
        m = msg.masks[int(rng.integers(len(msg.masks)))]
        m.n_units = int(rng.choice([0, 1, m.n_units + 1, max(0, m.n_units - 1), 2**32 - 1]))
        return "fields:mask_units"
    if op == "mask_bits" and msg.masks:
        m = msg.masks[int(rng.integers(len(msg.masks)))]
        m.bits = bytes(len(m.bits)) if rng.random() < 0.5 else rng.integers(0, 256, len(m.bits), np.uint8).tobytes()
        return "fields:mask_bits"  # all-zero masks keep no unit at all
    if op == "mask_group":
        msg.masks.add(group=str(rng.choice(["nope", "", "head"])), n_units=8, bits=b"\x0f")
        return "fields:mask_group"
    if op == "expiry":
        msg.expires_at_ms = int(rng.choice([1, -5, 2**62]))
        return f"fields:expiry={msg.expires_at_ms}"
    field_name = str(rng.choice(["bundle_id", "model_id", "base_version", "device_id"]))
    setattr(msg, field_name, str(rng.choice(["", "other", "x" * 300, "\x00", "../../etc"])))
    return f"fields:ids {field_name}"


# -- the pipeline --------------------------------------------------------------------------------


def _same(a: DeltaBundle, b: DeltaBundle) -> bool:
    return (a.bundle_id, a.model_id, a.base_version, a.device_id, a.created_at_ms, a.expires_at_ms) == \
        (b.bundle_id, b.model_id, b.base_version, b.device_id, b.created_at_ms, b.expires_at_ms) and \
        a.factors.keys() == b.factors.keys() and a.masks.keys() == b.masks.keys() and \
        all(np.array_equal(a.factors[s][i], b.factors[s][i]) for s in a.factors for i in (0, 1)) and \
        all(np.array_equal(a.masks[g], b.masks[g]) for g in a.masks)


def fuzz_bundles(package: DevicePackage, n_mutants: int, seed: int = 0, device_id: str = "fuzz-device",
                 max_seconds: float | None = None, runtime: DeviceRuntime | None = None) -> FuzzReport:
    """Run `n_mutants` mutants (or as many as fit in `max_seconds`) through the device's bundle path."""
    rng = np.random.default_rng(seed)
    runtime = runtime or DeviceRuntime(package, threads=1)
    history = rng.integers(1, package.n_items + 1, package.max_len)
    candidates = rng.integers(1, package.n_items + 1, 32)
    seeds = []  # (the bundle as a device decodes it, its bytes)
    for i in range(8):
        data = encode_bundle(seed_bundle(package, rng, device_id), ENCODINGS[i % len(ENCODINGS)])
        seeds.append((decode_bundle(data), data))
    report = FuzzReport()
    started = time.perf_counter()
    for i in range(n_mutants):
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
        original, data = seeds[int(rng.integers(len(seeds)))]
        if rng.random() < 0.5:
            mutant, recipe = mutate_bytes(data, seeds[int(rng.integers(len(seeds)))][1], rng)
            resealed = False
        else:
            msg = pb.DeltaBundle()
            msg.ParseFromString(data)
            recipe = mutate_fields(msg, rng, package)
            reseal(msg)
            mutant, resealed = msg.SerializeToString(), True
        t0 = time.perf_counter()
        stage = "decode+verify"
        try:
            bundle = verify_bundle(mutant, package.model_id, package.base_version, decode_bundle, device_id=device_id)
            if not resealed and not _same(bundle, original):
                report.accepted_corrupt.append(f"mutant {i} ({recipe}) decoded to a different bundle")
            stage = "apply"
            runtime.apply(bundle)
            stage = "score"
            scores = runtime.score(history, candidates)
            if not np.isfinite(scores).all():
                report.crashes.append(f"mutant {i} ({recipe}): accepted, then non-finite scores")
            else:
                report.accepted += 1
        except REFUSALS:
            report.refused[stage] += 1
        except Exception as exc:  # the point of the fuzzer: anything untyped is a crash
            report.crashes.append(f"mutant {i} ({recipe}) at {stage}: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            runtime.revert()
        report.slowest_mutant_s = max(report.slowest_mutant_s, time.perf_counter() - t0)
        report.mutants += 1
    report.seconds = time.perf_counter() - started
    return report

"""DeltaBundle: one device's generated parameter update, and its compact tensor encodings.

This module is numpy-only and knows nothing about protobuf; `common/serde.py` is the single place
where these types meet the wire messages of `protos/paramcast/v1/param_service.proto`.

A bundle holds, per adapter slot, low-rank factors A (d, r) and B (r, k) with delta W = A @ B, and
per unit group a boolean keep-mask. On the wire each factor is an `EncodedTensor` in one of
`ENCODINGS`:

    fp32  float32 little-endian, exact
    fp16  float16 little-endian
    int8  int8 with one float32 scale per row: value[i, j] = q[i, j] * scale[i]

The int8 scale of a row is max|row| / 127 rounded *up* to a float32 with a 16-bit significand.
That costs nothing in accuracy (2^-16 relative on the scale versus 1/254 from int8 itself) and
makes every q * scale with |q| <= 127 exactly representable in float32, so dequantisation is exact
and re-encoding a decoded tensor reproduces the same bytes (the codec is idempotent). Rows whose
largest magnitude is below INT8_FLUSH (2^-100) are sent as zeros with scale 0: their scale would be
a float32 subnormal, too coarse to keep those guarantees, and such values never move a score.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.errors import InvalidInput

ENCODINGS = ("int8", "fp16", "fp32")

# Numbers of the proto enum paramcast.v1.DataType; they enter the checksum, so they are fixed here
# (tests/unit/test_protos.py asserts they equal the generated enum).
DTYPE_CODES = {"fp32": 1, "fp16": 2, "int8": 3}

# Bytes per stored element of each encoding.
ITEM_SIZE = {"fp32": 4, "fp16": 2, "int8": 1}
_NUMPY_DTYPE: dict[str, np.dtype] = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "int8": np.dtype("i1")}

CHECKSUM_MAGIC = b"PCB1"  # format tag at the start of the canonical payload
INT8_FLUSH = 2.0**-100  # int8 rows with max|row| below this encode as zeros (see module docstring)


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedTensor:
    """A rank-2 tensor as it travels: `dtype` in ENCODINGS, row-major little-endian `data`,
    and for int8 `row_scales` (shape[0] float32 little-endian), else b""."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    row_scales: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.row_scales)


def _int8_row_scales(x: np.ndarray) -> np.ndarray:
    """Per-row symmetric scales of a finite (rows, cols) array, as float32 with a 16-bit significand
    rounded up (so max|row| <= 127 * scale and q * scale is exact in float32 for |q| <= 127);
    0 for rows below INT8_FLUSH, so every non-zero scale is a normal float32."""
    absmax = np.abs(x.astype(np.float64)).max(axis=1, initial=0.0)  # (rows,)
    exact = np.where(absmax < INT8_FLUSH, 0.0, absmax / 127.0)  # (rows,) float64
    scales = exact.astype(np.float32)
    # float64 -> float32 rounds to nearest; step up where that went below the exact value.
    below = scales.astype(np.float64) < exact
    scales[below] = np.nextafter(scales[below], np.float32(np.inf))
    # Round the significand up to 16 bits: clear the low 8 of the 23 stored fraction bits, carrying
    # into the exponent when needed (positive float32 bit patterns order like the values they encode).
    bits = scales.view(np.uint32)
    bits = (bits + np.uint32(0xFF)) & np.uint32(0xFFFFFF00)
    return bits.view(np.float32)


def quantize(x: np.ndarray, encoding: str) -> EncodedTensor:
    """Encode a finite rank-2 float array as `encoding` (one of ENCODINGS)."""
    if encoding not in ENCODINGS:
        raise InvalidInput("encoding", f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidInput("tensor", f"expected a rank-2 array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise InvalidInput("tensor", f"expected a numeric array, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf, rejected below
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput("tensor", "contains NaN or infinite values (or exceeds the float32 range)")
    shape = tuple(int(n) for n in x.shape)

    if encoding == "fp32":
        return EncodedTensor("fp32", shape, x.astype("<f4").tobytes())
    if encoding == "fp16":
        # |x| >= 65520 rounds to inf in float16 (65504 is the largest finite half).
        if x.size and np.abs(x).max() >= 65520.0:
            raise InvalidInput("tensor", "values exceed the float16 range (|x| > 65504); use fp32")
        return EncodedTensor("fp16", shape, x.astype("<f2").tobytes())

    scales = _int8_row_scales(x)  # (rows,)
    if (scales.astype(np.float64) * 127 > np.finfo(np.float32).max).any():
        # Only within 2^-15 of float32's maximum: the rounded-up scale would decode +-127 to inf.
        raise InvalidInput("tensor", "values too close to the float32 maximum for int8; use fp32")
    # Divide in float64 so the rounding to the nearest multiple of the scale is exact; rows with
    # scale 0 (all below INT8_FLUSH) quantise to 0.
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]  # (rows, 1)
    q = np.clip(np.rint(x.astype(np.float64) / safe), -127, 127).astype(np.int8)  # (rows, cols)
    return EncodedTensor("int8", shape, q.tobytes(), scales.astype("<f4").tobytes())


def dequantize(t: EncodedTensor) -> np.ndarray:
    """Decode an EncodedTensor to a float32 array of t.shape. Raises InvalidInput if the byte
    lengths do not match the shape (serde validates first and reports IntegrityError instead)."""
    if t.dtype not in ENCODINGS:
        raise InvalidInput("dtype", f"unknown encoding {t.dtype!r}")
    n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
    if len(t.data) != n * ITEM_SIZE[t.dtype]:
        raise InvalidInput("data", f"{len(t.data)} bytes do not hold {t.dtype} {t.shape}")
    values = np.frombuffer(t.data, dtype=_NUMPY_DTYPE[t.dtype]).reshape(t.shape)
    if t.dtype != "int8":
        return values.astype(np.float32)
    rows = t.shape[0]
    if len(t.row_scales) != 4 * rows:
        raise InvalidInput("row_scales", f"{len(t.row_scales)} bytes, expected {4 * rows}")
    scales = np.frombuffer(t.row_scales, dtype="<f4").astype(np.float32)  # (rows,)
    return values.astype(np.float32) * scales.reshape((rows,) + (1,) * (len(t.shape) - 1))


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def pack_mask(mask: np.ndarray) -> bytes:
    """Bool (n_units,) -> ceil(n_units / 8) bytes, little-endian bit order (unit u is bit u % 8 of
    byte u // 8); padding bits are zero."""
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise InvalidInput("mask", f"expected a 1-D array, got shape {mask.shape}")
    return np.packbits(mask.astype(bool), bitorder="little").tobytes()


def unpack_mask(bits: bytes, n_units: int) -> np.ndarray:
    """Inverse of pack_mask: -> bool (n_units,). `bits` must hold exactly ceil(n_units / 8) bytes."""
    if n_units < 0 or len(bits) != (n_units + 7) // 8:
        raise InvalidInput("bits", f"{len(bits)} bytes cannot hold exactly {n_units} units")
    unpacked = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    return unpacked[:n_units].astype(bool)


# ---------------------------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------------------------


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _blob(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _tensor(t: EncodedTensor) -> bytes:
    head = struct.pack("<II", DTYPE_CODES[t.dtype], len(t.shape))
    dims = struct.pack(f"<{len(t.shape)}q", *t.shape)
    return head + dims + _blob(t.data) + _blob(t.row_scales)


def payload_checksum(
    bundle_id: str,
    model_id: str,
    base_version: str,
    created_at_ms: int,
    expires_at_ms: int,
    slots: Sequence[tuple[str, EncodedTensor, EncodedTensor]],
    masks: Sequence[tuple[str, int, bytes]],
) -> bytes:
    """SHA-256 (32 bytes) of the canonical payload, in wire order.

    Layout (integers little-endian; defined once more in the .proto at DeltaBundle.checksum):
        "PCB1" str(bundle_id) str(model_id) str(base_version) i64(created_at_ms) i64(expires_at_ms)
        u32(len(slots)) then per slot: str(slot) tensor(a) tensor(b)
        u32(len(masks)) then per mask: str(group) u32(n_units) blob(bits)
    with str = u32 length + UTF-8, blob = u64 length + bytes, tensor = u32 dtype code, u32 rank,
    i64 dims, blob(data), blob(row_scales). Length prefixes make the encoding unambiguous, so no two
    different bundles share a payload.
    """
    h = hashlib.sha256()
    h.update(CHECKSUM_MAGIC)
    h.update(_str(bundle_id) + _str(model_id) + _str(base_version))
    h.update(struct.pack("<qq", created_at_ms, expires_at_ms))
    h.update(struct.pack("<I", len(slots)))
    for name, a, b in slots:
        h.update(_str(name))
        h.update(_tensor(a))
        h.update(_tensor(b))
    h.update(struct.pack("<I", len(masks)))
    for group, n_units, bits in masks:
        h.update(_str(group) + struct.pack("<I", n_units) + _blob(bits))
    return h.digest()


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------


@dataclass
class DeltaBundle:
    """A generated update for one device, valid only on (model_id, base_version).

    factors: slot -> (A (d, r) float32, B (r, k) float32), delta W = A @ B
    masks:   unit group -> bool (n_units,), True = keep the unit
    expires_at_ms = 0 means it never expires.
    """

    model_id: str
    base_version: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    bundle_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at_ms: int = field(default_factory=_now_ms)
    expires_at_ms: int = 0

    def __post_init__(self) -> None:
        # Normalise once here so every consumer can rely on float32 factors and bool masks.
        factors = {}
        for slot, pair in self.factors.items():
            if len(pair) != 2:
                raise InvalidInput(f"factors[{slot!r}]", "expected a pair (A, B)")
            a = np.ascontiguousarray(pair[0], dtype=np.float32)
            b = np.ascontiguousarray(pair[1], dtype=np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise InvalidInput(
                    f"factors[{slot!r}]", f"expected A (d, r) and B (r, k), got {a.shape} and {b.shape}"
                )
            factors[slot] = (a, b)
        self.factors = factors
        masks = {}
        for group, mask in self.masks.items():
            mask = np.asarray(mask)
            if mask.ndim != 1:
                raise InvalidInput(f"masks[{group!r}]", f"expected a 1-D array, got shape {mask.shape}")
            masks[group] = mask.astype(bool)
        self.masks = masks

    def n_parameters(self) -> int:
        """Number of generated factor values (entries of every A and B); mask bits not counted."""
        return sum(a.size + b.size for a, b in self.factors.values())

    def is_expired(self, now_ms: int | None = None) -> bool:
        """True once now_ms (default: the current time) reaches expires_at_ms; never if that is 0."""
        if self.expires_at_ms == 0:
            return False
        return (_now_ms() if now_ms is None else now_ms) >= self.expires_at_ms

    def delta(self, slot: str) -> np.ndarray:
        """The dense weight update A @ B of one slot: (d, k) float32."""
        a, b = self.factors[slot]
        return a @ b

    def quantized(self, encoding: str) -> DeltaBundle:
        """The bundle a device decodes after this one is sent as `encoding` (same ids and masks):
        use it to measure quality after encoding."""
        factors = {
            slot: (dequantize(quantize(a, encoding)), dequantize(quantize(b, encoding)))
            for slot, (a, b) in self.factors.items()
        }
        return DeltaBundle(
            model_id=self.model_id,
            base_version=self.base_version,
            factors=factors,
            masks={g: m.copy() for g, m in self.masks.items()},
            bundle_id=self.bundle_id,
            created_at_ms=self.created_at_ms,
            expires_at_ms=self.expires_at_ms,
        )

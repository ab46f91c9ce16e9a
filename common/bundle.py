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

A bundle on its way out is an `EncodedBundle`: its factors encoded, its masks packed, its
checksum filled; `common/serde.py` maps that field for field onto the wire message. The server
encodes a whole generator batch at once: `BundleBatch` holds n bundles of one layout with a
leading batch axis, and `BundleBatch.encoded` (through `quantize_stack` / `pack_mask_stack`)
encodes n tensors or masks in one numpy pass with exactly the bytes `DeltaBundle.encoded` gives
for each alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from paramcast.common.errors import DeviceMismatch, InvalidInput, VersionMismatch


@dataclass(frozen=True)
class Encoding:
    """One way a factor tensor travels: the registry below is the only list of them."""

    name: str
    # The number of the proto enum paramcast.v1.DataType; it enters the checksum, so it is fixed here
    # (tests/unit/test_protos.py asserts it equals the generated enum).
    dtype_code: int
    item_size: int  # bytes per stored element
    stored_as: np.dtype  # how the stored elements read (little-endian)


ENCODING: dict[str, Encoding] = {e.name: e for e in (
    Encoding("int8", 3, 1, np.dtype("i1")),
    Encoding("fp16", 2, 2, np.dtype("<f2")),
    Encoding("fp32", 1, 4, np.dtype("<f4")),
)}
ENCODINGS = tuple(ENCODING)  # ("int8", "fp16", "fp32")
DTYPE_CODES = {e.name: e.dtype_code for e in ENCODING.values()}

CHECKSUM_MAGIC = b"PCB2"  # format tag at the start of the canonical payload (2: device_id joined it)
INT8_FLUSH = 2.0**-100  # int8 rows with max|row| below this encode as zeros (see module docstring)


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_encoding(encoding: str, field: str = "encoding") -> Encoding:
    """The registered encoding of that name; InvalidInput naming `field` for any other name."""
    try:
        return ENCODING[encoding]
    except (KeyError, TypeError):  # TypeError: not a hashable name at all
        raise InvalidInput(field, f"unknown encoding {encoding!r}; expected one of {ENCODINGS}") from None


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


def _row_absmax(x: np.ndarray) -> np.ndarray:
    """max |x| of each row of a (rows, cols) float array, 0 for rows with no columns (exact: abs
    and max do not round). numpy reduces a short contiguous axis one row at a time, which is slow
    for stacked A factors (rows = n * d, cols = rank ~ 4); those take the maximum column by column."""
    ax = np.abs(x)  # (rows, cols)
    rows, cols = ax.shape
    if cols == 0 or cols > 16:
        return ax.max(axis=1, initial=0.0)
    out = ax[:, 0].copy()  # (rows,)
    for j in range(1, cols):
        np.maximum(out, ax[:, j], out=out)
    return out


def _int8_row_scales(x: np.ndarray) -> np.ndarray:
    """Per-row symmetric scales of a finite (rows, cols) array, as float32 with a 16-bit significand
    rounded up (so max|row| <= 127 * scale and q * scale is exact in float32 for |q| <= 127);
    0 for rows below INT8_FLUSH, so every non-zero scale is a normal float32."""
    absmax = _row_absmax(x).astype(np.float64)  # (rows,)
    exact = np.where(absmax < INT8_FLUSH, 0.0, absmax / 127.0)  # (rows,) float64
    scales = exact.astype(np.float32)
    # float64 -> float32 rounds to nearest; step up where that went below the exact value.
    below = scales.astype(np.float64) < exact  # (rows,)
    scales = np.where(below, np.nextafter(scales, np.float32(np.inf)), scales)
    # Round the significand up to 16 bits: clear the low 8 of the 23 stored fraction bits, carrying
    # into the exponent when needed (positive float32 bit patterns order like the values they encode).
    bits = scales.view(np.uint32)
    bits = (bits + np.uint32(0xFF)) & np.uint32(0xFFFFFF00)
    return bits.view(np.float32)


def quantize(x: np.ndarray, encoding: str) -> EncodedTensor:
    """Encode a finite rank-2 float array as `encoding` (one of ENCODINGS)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidInput("tensor", f"expected a rank-2 array, got shape {x.shape}")
    return quantize_stack(x[None], encoding)[0]


def quantize_stack(x: np.ndarray, encoding: str) -> list[EncodedTensor]:
    """Encode n same-shaped rank-2 tensors, given as one (n, rows, cols) array, in one pass.

    Element i is byte-identical to quantize(x[i], encoding): fp16 and fp32 convert element by
    element, and int8 scales are per row, so stacking the n tensors into n * rows rows changes
    nothing but the number of numpy calls (the server encodes a whole generator batch this way).
    """
    check_encoding(encoding)
    x = np.asarray(x)
    if x.ndim != 3:
        raise InvalidInput("tensor", f"expected a stack of rank-2 arrays (n, rows, cols), got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise InvalidInput("tensor", f"expected a numeric array, got dtype {x.dtype}")
    if x.dtype != np.float32:  # (the generator's float32 output skips this: no copy, no errstate)
        with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf, rejected below
            x = x.astype(np.float32)
    n, rows, cols = (int(d) for d in x.shape)
    shape = (rows, cols)

    # Checks run over the whole stack at once; only a failing one looks for the tensor to name.
    def fail(bad: np.ndarray, problem: str) -> InvalidInput:
        # bad: (n, ...) bool, True at offending values; name the first tensor holding one.
        which = f"tensor {int(np.flatnonzero(bad.reshape(n, -1).any(axis=1))[0])} of {n}: " if n > 1 else ""
        return InvalidInput("tensor", which + problem)

    if not np.isfinite(x).all():
        raise fail(~np.isfinite(x), "contains NaN or infinite values (or exceeds the float32 range)")

    def split(data: bytes, step: int) -> list[EncodedTensor]:
        # data holds the n tensors back to back, `step` bytes each.
        return [EncodedTensor(encoding, shape, data[i * step:(i + 1) * step]) for i in range(n)]

    if encoding == "fp32":
        return split(x.astype("<f4").tobytes(), 4 * rows * cols)
    if encoding == "fp16":
        # |x| >= 65520 rounds to inf in float16 (65504 is the largest finite half).
        if x.size and np.abs(x).max() >= 65520.0:
            raise fail(np.abs(x) >= 65520.0, "values exceed the float16 range (|x| > 65504); use fp32")
        return split(x.astype("<f2").tobytes(), 2 * rows * cols)

    flat = x.reshape(n * rows, cols)  # (n * rows, cols): every tensor row is one scaled row
    scales = _int8_row_scales(flat)  # (n * rows,)
    f32_max = float(np.finfo(np.float32).max)  # a Python float: the products below stay float64
    if scales.size and float(scales.max()) * 127 > f32_max:
        # Only within 2^-15 of float32's maximum: the rounded-up scale would decode +-127 to inf.
        raise fail(scales.astype(np.float64).reshape(n, rows) * 127 > f32_max,
                   "values too close to the float32 maximum for int8; use fp32")
    # Divide in float64 so the rounding to the nearest multiple of the scale is exact; rows with
    # scale 0 (all below INT8_FLUSH) quantise to 0.
    # In place on one buffer: a batch's temporaries are large enough that allocating one per step
    # (page faults on fresh memory) costs more than the arithmetic.
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]  # (n * rows, 1)
    q64 = flat.astype(np.float64)  # (n * rows, cols)
    np.divide(q64, safe, out=q64)
    np.rint(q64, out=q64)
    np.maximum(q64, -127, out=q64)  # clip to [-127, 127] with bare ufuncs (np.clip's wrapper costs
    np.minimum(q64, 127, out=q64)  # more than the clipping at n = 1)
    q = q64.astype(np.int8)  # (n * rows, cols)
    data, scale_bytes = q.tobytes(), scales.astype("<f4").tobytes()
    step, scale_step = rows * cols, 4 * rows
    return [
        EncodedTensor("int8", shape, data[i * step:(i + 1) * step], scale_bytes[i * scale_step:(i + 1) * scale_step])
        for i in range(n)
    ]


def dequantize(t: EncodedTensor) -> np.ndarray:
    """Decode an EncodedTensor to a float32 array of t.shape. Raises InvalidInput if the byte
    lengths do not match the shape (serde validates first and reports IntegrityError instead)."""
    enc = check_encoding(t.dtype, "dtype")
    n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
    if len(t.data) != n * enc.item_size:
        raise InvalidInput("data", f"{len(t.data)} bytes do not hold {t.dtype} {t.shape}")
    values = np.frombuffer(t.data, dtype=enc.stored_as).reshape(t.shape)
    if t.dtype != "int8":
        return values.astype(np.float32)
    rows = t.shape[0]
    if len(t.row_scales) != 4 * rows:
        raise InvalidInput("row_scales", f"{len(t.row_scales)} bytes, expected {4 * rows}")
    scales = np.frombuffer(t.row_scales, dtype="<f4").astype(np.float32)  # (rows,)
    with np.errstate(over="ignore"):  # q * scale beyond float32 is inf, which decoders then refuse
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
    return pack_mask_stack(mask[None])[0]


def pack_mask_stack(masks: np.ndarray) -> list[bytes]:
    """Bool (n, n_units) -> n bitsets, each exactly pack_mask(masks[i]) (packbits pads every row)."""
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise InvalidInput("mask", f"expected a stack of 1-D masks (n, n_units), got shape {masks.shape}")
    packed = np.packbits(masks.astype(bool), axis=1, bitorder="little")  # (n, ceil(n_units / 8)) uint8
    return [row.tobytes() for row in packed]


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
    head = struct.pack("<II", ENCODING[t.dtype].dtype_code, len(t.shape))
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
    device_id: str = "",
) -> bytes:
    """SHA-256 (32 bytes) of the canonical payload, in wire order.

    Layout (integers little-endian; defined once more in the .proto at DeltaBundle.checksum):
        "PCB2" str(bundle_id) str(model_id) str(base_version) str(device_id)
        i64(created_at_ms) i64(expires_at_ms)
        u32(len(slots)) then per slot: str(slot) tensor(a) tensor(b)
        u32(len(masks)) then per mask: str(group) u32(n_units) blob(bits)
    with str = u32 length + UTF-8, blob = u64 length + bytes, tensor = u32 dtype code, u32 rank,
    i64 dims, blob(data), blob(row_scales). Length prefixes make the encoding unambiguous, so no two
    different bundles share a payload.
    """
    h = hashlib.sha256()
    h.update(CHECKSUM_MAGIC)
    h.update(_str(bundle_id) + _str(model_id) + _str(base_version) + _str(device_id))
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


@dataclass(frozen=True)
class EncodedBundle:
    """A bundle as it travels, in domain terms: factors encoded, masks packed, both sorted by name
    (so the same bundle always gives the same bytes), and the checksum over exactly these bytes."""

    bundle_id: str
    model_id: str
    base_version: str
    created_at_ms: int
    expires_at_ms: int
    slots: list[tuple[str, EncodedTensor, EncodedTensor]]  # (slot, A, B)
    masks: list[tuple[str, int, bytes]]  # (group, n_units, bits)
    checksum: bytes
    device_id: str = ""

    @classmethod
    def assemble(cls, bundle_id: str, model_id: str, base_version: str, created_at_ms: int, expires_at_ms: int,
                 slots: list[tuple[str, EncodedTensor, EncodedTensor]], masks: list[tuple[str, int, bytes]],
                 device_id: str = "") -> EncodedBundle:
        checksum = payload_checksum(bundle_id, model_id, base_version, created_at_ms, expires_at_ms, slots, masks,
                                    device_id)
        return cls(bundle_id, model_id, base_version, created_at_ms, expires_at_ms, slots, masks, checksum, device_id)


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------


def _normalised(factors: dict, masks: dict, batch: int | None) -> tuple[dict, dict]:
    """float32 contiguous factor pairs and bool masks, shape-checked; `batch` = n adds a leading axis of n."""
    lead = () if batch is None else (batch,)
    k = len(lead)
    want_a, want_b = ("(d, r)", "(r, k)") if batch is None else (f"({batch}, d, r)", f"({batch}, r, k)")
    out_factors = {}
    for slot, pair in factors.items():
        if len(pair) != 2:
            raise InvalidInput(f"factors[{slot!r}]", "expected a pair (A, B)")
        a = np.ascontiguousarray(pair[0], dtype=np.float32)
        b = np.ascontiguousarray(pair[1], dtype=np.float32)
        if (a.ndim != 2 + k or b.ndim != 2 + k or a.shape[:k] != lead or b.shape[:k] != lead
                or a.shape[k + 1] != b.shape[k]):
            raise InvalidInput(f"factors[{slot!r}]", f"expected A {want_a} and B {want_b}, got {a.shape} and {b.shape}")
        out_factors[slot] = (a, b)
    out_masks = {}
    for group, mask in masks.items():
        mask = np.asarray(mask)
        if mask.ndim != 1 + k or mask.shape[:k] != lead:
            want = "a 1-D array" if batch is None else f"({batch}, n_units)"
            raise InvalidInput(f"masks[{group!r}]", f"expected {want}, got shape {mask.shape}")
        out_masks[group] = mask.astype(bool)
    return out_factors, out_masks


@dataclass
class DeltaBundle:
    """A generated update for one device, valid only on (model_id, base_version).

    factors: slot -> (A (d, r) float32, B (r, k) float32), delta W = A @ B
    masks:   unit group -> bool (n_units,), True = keep the unit
    expires_at_ms = 0 means it never expires.
    device_id: the device it was generated for ("" = not bound to one: made in-process for
    evaluation or simulation; a device agent refuses such a bundle).
    """

    model_id: str
    base_version: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    bundle_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at_ms: int = field(default_factory=_now_ms)
    expires_at_ms: int = 0
    device_id: str = ""

    def __post_init__(self) -> None:
        # Normalise once here so every consumer can rely on float32 factors and bool masks.
        self.factors, self.masks = _normalised(self.factors, self.masks, batch=None)

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

    def encoded(self, encoding: str) -> EncodedBundle:
        """Every factor encoded as `encoding`, masks packed, checksum filled.

        Many bundles at once: `BundleBatch.encoded`, which gives the same bytes faster."""
        check_encoding(encoding)
        slots = [(name, quantize(a, encoding), quantize(b, encoding)) for name, (a, b) in sorted(self.factors.items())]
        masks = [(group, int(m.size), pack_mask(m)) for group, m in sorted(self.masks.items())]
        return EncodedBundle.assemble(self.bundle_id, self.model_id, self.base_version, self.created_at_ms,
                                      self.expires_at_ms, slots, masks, self.device_id)

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
            device_id=self.device_id,
        )


@dataclass
class BundleBatch:
    """n updates for the same (model_id, base_version) with the same slot and mask shapes, stacked
    along a leading axis: what one generator pass produces and what the codec encodes in one pass,
    without a DeltaBundle per device in between.

    factors: slot -> (A (n, d, r) float32, B (n, r, k) float32)
    masks:   unit group -> bool (n, n_units)
    bundle_ids, created_at_ms, expires_at_ms, device_ids: one entry per bundle, as in DeltaBundle
    (device_ids None = none bound; `bound_to` sets them).
    Bundle i of the batch is `unstack()[i]`.
    """

    model_id: str
    base_version: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    masks: dict[str, np.ndarray]
    bundle_ids: list[str]
    created_at_ms: list[int]
    expires_at_ms: list[int]
    device_ids: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.bundle_ids)
        if len(self.created_at_ms) != n or len(self.expires_at_ms) != n:
            raise InvalidInput("bundle_ids", f"{n} ids but {len(self.created_at_ms)} creation and "
                                             f"{len(self.expires_at_ms)} expiry times")
        if self.device_ids is not None and len(self.device_ids) != n:
            raise InvalidInput("device_ids", f"{len(self.device_ids)} device ids for a batch of {n} bundles")
        self.factors, self.masks = _normalised(self.factors, self.masks, batch=n)

    @classmethod
    def fresh(cls, model_id: str, base_version: str, factors: dict[str, tuple[np.ndarray, np.ndarray]],
              masks: dict[str, np.ndarray] | None = None, ttl_ms: int = 0) -> BundleBatch:
        """A batch of newly generated bundles: new ids, created now, expiring after `ttl_ms` (0 = never).
        The batch size is the leading axis of the factors (or, without factors, of the masks)."""
        masks = masks or {}
        leading = [a.shape[0] for a, _ in factors.values()] + [m.shape[0] for m in masks.values()]
        if not leading:
            raise InvalidInput("factors", "a batch needs factors or masks to know its size")
        n = int(leading[0])
        now = _now_ms()
        return cls(model_id, base_version, factors, masks, bundle_ids=[uuid.uuid4().hex for _ in range(n)],
                   created_at_ms=[now] * n, expires_at_ms=[now + ttl_ms if ttl_ms else 0] * n)

    @classmethod
    def stack(cls, bundles: Sequence[DeltaBundle]) -> BundleBatch:
        """Stack bundles that share model id, base version, slot shapes and mask sizes (see `layout`)."""
        if not bundles:
            raise InvalidInput("bundles", "cannot stack an empty list (the batch would have no layout)")
        first = layout(bundles[0])
        for i, bundle in enumerate(bundles):
            if layout(bundle) != first:
                raise InvalidInput(f"bundles[{i}]", f"layout {layout(bundle)} differs from bundle 0's {first}; "
                                                    "only bundles of one layout stack")
        return cls(
            model_id=bundles[0].model_id,
            base_version=bundles[0].base_version,
            factors={slot: (np.stack([b.factors[slot][0] for b in bundles]),  # (n, d, r)
                            np.stack([b.factors[slot][1] for b in bundles]))  # (n, r, k)
                     for slot in bundles[0].factors},
            masks={group: np.stack([b.masks[group] for b in bundles]) for group in bundles[0].masks},  # (n, units)
            bundle_ids=[b.bundle_id for b in bundles],
            created_at_ms=[b.created_at_ms for b in bundles],
            expires_at_ms=[b.expires_at_ms for b in bundles],
            device_ids=[b.device_id for b in bundles] if any(b.device_id for b in bundles) else None,
        )

    def __len__(self) -> int:
        return len(self.bundle_ids)

    def take(self, indices: Sequence[int]) -> BundleBatch:
        """The sub-batch of the bundles at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return BundleBatch(
            model_id=self.model_id,
            base_version=self.base_version,
            factors={slot: (a[idx], b[idx]) for slot, (a, b) in self.factors.items()},
            masks={group: m[idx] for group, m in self.masks.items()},
            bundle_ids=[self.bundle_ids[i] for i in idx],
            created_at_ms=[self.created_at_ms[i] for i in idx],
            expires_at_ms=[self.expires_at_ms[i] for i in idx],
            device_ids=None if self.device_ids is None else [self.device_ids[i] for i in idx],
        )

    def bound_to(self, device_ids: Sequence[str]) -> BundleBatch:
        """The same bundles, bundle i generated for device `device_ids[i]` (what the service sends)."""
        return dataclasses.replace(self, device_ids=list(device_ids))

    def device_id(self, i: int) -> str:
        return "" if self.device_ids is None else self.device_ids[i]

    def encoded(self, encoding: str | Sequence[str]) -> list[EncodedBundle]:
        """The encoded bundles of the batch, bundle i byte-identical to `self.unstack()[i].encoded(...)`.

        `encoding` is one name for the whole batch or one per bundle (devices in one generator batch
        may ask for different encodings). Each factor is quantised once per encoding for all its
        bundles (`quantize_stack`), and each mask group packed once; only the checksum is computed
        per bundle.
        """
        n = len(self)
        per_bundle = [encoding] * n if isinstance(encoding, str) else list(encoding)
        if len(per_bundle) != n:
            raise InvalidInput("encoding", f"{len(per_bundle)} encodings for a batch of {n} bundles")
        for name in set(per_bundle):
            check_encoding(name)
        out: list[EncodedBundle | None] = [None] * n
        for name in sorted(set(per_bundle)):
            idx = [i for i, e in enumerate(per_bundle) if e == name]
            group = self if len(idx) == n else self.take(idx)
            # slot -> (A, B) encodings, one per bundle of the group
            encoded = {slot: (quantize_stack(a, name), quantize_stack(b, name))
                       for slot, (a, b) in sorted(group.factors.items())}
            packed = {g: (int(m.shape[1]), pack_mask_stack(m)) for g, m in sorted(group.masks.items())}
            for j, i in enumerate(idx):
                slots = [(slot, a[j], b[j]) for slot, (a, b) in encoded.items()]
                masks = [(g, n_units, bits[j]) for g, (n_units, bits) in packed.items()]
                out[i] = EncodedBundle.assemble(group.bundle_ids[j], group.model_id, group.base_version,
                                                group.created_at_ms[j], group.expires_at_ms[j], slots, masks,
                                                group.device_id(j))
        return cast(list[EncodedBundle], out)

    def unstack(self) -> list[DeltaBundle]:
        """One DeltaBundle per device; its arrays are views into this batch's."""
        return [
            DeltaBundle(
                model_id=self.model_id,
                base_version=self.base_version,
                factors={slot: (a[i], b[i]) for slot, (a, b) in self.factors.items()},
                masks={group: m[i] for group, m in self.masks.items()},
                bundle_id=self.bundle_ids[i],
                created_at_ms=self.created_at_ms[i],
                expires_at_ms=self.expires_at_ms[i],
                device_id=self.device_id(i),
            )
            for i in range(len(self))
        ]


Layout = tuple[str, str, tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...], tuple[tuple[str, int], ...]]


def layout(bundle: DeltaBundle) -> Layout:
    """What bundles must share to stack into one BundleBatch: model id, base version, every slot's
    factor shapes and every mask group's size."""
    slots = tuple((slot, a.shape, b.shape) for slot, (a, b) in sorted(bundle.factors.items()))
    masks = tuple((group, int(m.size)) for group, m in sorted(bundle.masks.items()))
    return bundle.model_id, bundle.base_version, slots, masks


def check_bundle_for(bundle: DeltaBundle, model_id: str, base_version: str, device_id: str | None = None) -> None:
    """Raise VersionMismatch unless `bundle` was generated for the model and base version held, and,
    when `device_id` is given, DeviceMismatch unless it was generated for that device."""
    if bundle.model_id != model_id:
        raise VersionMismatch(
            f"bundle {bundle.bundle_id} is for model {bundle.model_id!r}, but the device runs {model_id!r}"
        )
    if bundle.base_version != base_version:
        raise VersionMismatch(
            f"bundle {bundle.bundle_id} was generated for base version {bundle.base_version!r}, "
            f"but the device holds {base_version!r}"
        )
    if device_id is not None and bundle.device_id != device_id:
        generated_for = repr(bundle.device_id) if bundle.device_id else "no device"
        raise DeviceMismatch(
            f"bundle {bundle.bundle_id} was generated for {generated_for[:140]}, not for this device {device_id!r}"
        )

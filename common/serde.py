"""The one crossing between protobuf and ParamCast's domain types.

Only this module (and the gRPC edges that call it: the servicer and server, the device client)
imports the generated `param_service_pb2`; the service core, model, generator and device runtime
work with `common.bundle.DeltaBundle` / `EncodedBundle` and numpy arrays.

Decoding is defensive: bytes from the network or from disk are either turned into a fully
validated DeltaBundle whose checksum verifies, or rejected with `IntegrityError` naming the field
that was wrong. Nothing else escapes `decode_bundle` / `bundle_from_proto`, whatever the input.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError

from paramcast.common.bundle import (
    DTYPE_CODES,
    ENCODING,
    BundleBatch,
    DeltaBundle,
    EncodedBundle,
    EncodedTensor,
    check_encoding,
    dequantize,
    payload_checksum,
    unpack_mask,
)
from paramcast.common.errors import IntegrityError, InvalidInput
from paramcast.v1 import param_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParamService"].full_name  # "paramcast.v1.ParamService"
DEFAULT_ENCODING = "int8"  # what ENCODING_UNSPECIFIED means

_ENCODING_TO_PROTO: dict[str, pb.Encoding] = {
    "int8": pb.ENCODING_INT8,
    "fp16": pb.ENCODING_FP16,
    "fp32": pb.ENCODING_FP32,
}
_ENCODING_FROM_PROTO: dict[int, str] = {v: k for k, v in _ENCODING_TO_PROTO.items()}
_DTYPE_TO_PROTO: dict[str, pb.DataType] = {"fp32": pb.FLOAT32, "fp16": pb.FLOAT16, "int8": pb.INT8_ROW_SCALED}
_DTYPE_FROM_PROTO: dict[int, str] = {code: name for name, code in _DTYPE_TO_PROTO.items()}
# common.bundle checksums with its own copy of the numbers; the two must never drift apart.
assert _DTYPE_TO_PROTO == DTYPE_CODES, "common.bundle.DTYPE_CODES out of sync with paramcast.v1.DataType"

# Upper bound on one tensor dimension. Real factors are far smaller; the bound keeps a corrupted
# shape from making numpy attempt absurd allocations or overflow when computing sizes.
_MAX_DIM = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------


def encoding_to_proto(encoding: str) -> pb.Encoding:
    """Encoding name ("int8", "fp16" or "fp32") -> paramcast.v1.Encoding value."""
    return _ENCODING_TO_PROTO[check_encoding(encoding).name]


def encoding_from_proto(value: int) -> str:
    """paramcast.v1.Encoding value -> encoding name; UNSPECIFIED means the server default, int8."""
    if value == pb.ENCODING_UNSPECIFIED:
        return DEFAULT_ENCODING
    try:
        return _ENCODING_FROM_PROTO[value]
    except KeyError:
        raise InvalidInput("encoding", f"unknown Encoding value {value}") from None


# ---------------------------------------------------------------------------------------------
# Domain -> wire
# ---------------------------------------------------------------------------------------------


def _tensor_fields(t: EncodedTensor) -> dict:
    # Message fields given as dicts: the constructor fills the nested messages in place, about twice
    # as fast as building each pb.Tensor and having the parent copy it.
    return {"dtype": _DTYPE_TO_PROTO[t.dtype], "shape": t.shape, "data": t.data, "row_scales": t.row_scales}


def encoded_to_proto(e: EncodedBundle) -> pb.DeltaBundle:
    """The wire message of an encoded bundle, field for field."""
    return pb.DeltaBundle(
        bundle_id=e.bundle_id,
        model_id=e.model_id,
        base_version=e.base_version,
        device_id=e.device_id,
        slots=[{"slot": n, "a": _tensor_fields(a), "b": _tensor_fields(b)} for n, a, b in e.slots],
        masks=[{"group": g, "n_units": n, "bits": bits} for g, n, bits in e.masks],
        created_at_ms=e.created_at_ms,
        expires_at_ms=e.expires_at_ms,
        checksum=e.checksum,
    )


def bundle_to_proto(bundle: DeltaBundle, encoding: str = DEFAULT_ENCODING) -> pb.DeltaBundle:
    """Encode every factor as `encoding`, pack masks, and fill the checksum (`DeltaBundle.encoded`)."""
    return encoded_to_proto(bundle.encoded(encoding))


def batch_to_proto(batch: BundleBatch, encoding: str | Sequence[str] = DEFAULT_ENCODING) -> list[pb.DeltaBundle]:
    """The wire messages of a stacked batch (`BundleBatch.encoded`), message i byte-identical to
    bundle_to_proto(batch.unstack()[i])."""
    return [encoded_to_proto(e) for e in batch.encoded(encoding)]


def encode_bundle(bundle: DeltaBundle, encoding: str = DEFAULT_ENCODING) -> bytes:
    """Serialized paramcast.v1.DeltaBundle, e.g. for the device's on-disk copy of its last bundle."""
    return bundle_to_proto(bundle, encoding).SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------
# Wire -> domain (validated)
# ---------------------------------------------------------------------------------------------


def _tensor_from_proto(msg: pb.Tensor, where: str) -> EncodedTensor:
    """Check one Tensor's structure (not yet its checksum) and return it as an EncodedTensor."""
    dtype = _DTYPE_FROM_PROTO.get(msg.dtype)
    if dtype is None:
        raise IntegrityError(f"{where}.dtype: unknown or unspecified DataType {msg.dtype}")
    shape = tuple(int(n) for n in msg.shape)
    if len(shape) != 2:
        raise IntegrityError(f"{where}.shape: expected rank 2, got {list(shape)}")
    if any(n < 0 or n > _MAX_DIM for n in shape):
        raise IntegrityError(f"{where}.shape: dimensions must be in [0, {_MAX_DIM}], got {list(shape)}")
    expected = shape[0] * shape[1] * ENCODING[dtype].item_size  # Python ints: no overflow
    if len(msg.data) != expected:
        raise IntegrityError(
            f"{where}.data: {len(msg.data)} bytes, expected {expected} for {dtype} {list(shape)}"
        )
    expected_scales = 4 * shape[0] if dtype == "int8" else 0
    if len(msg.row_scales) != expected_scales:
        raise IntegrityError(f"{where}.row_scales: {len(msg.row_scales)} bytes, expected {expected_scales}")
    return EncodedTensor(dtype, shape, msg.data, msg.row_scales)


def _decode_tensor(t: EncodedTensor, where: str) -> np.ndarray:
    """Dequantize a structurally valid tensor, refusing values a device must never apply."""
    if t.dtype == "int8":
        scales = np.frombuffer(t.row_scales, dtype="<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise IntegrityError(f"{where}.row_scales: scales must be finite and >= 0")
    values = dequantize(t)
    if not np.isfinite(values).all():
        raise IntegrityError(f"{where}.data: contains NaN or infinite values")
    return values


def bundle_from_proto(msg: pb.DeltaBundle) -> DeltaBundle:
    """Validate a wire DeltaBundle and decode it; raises IntegrityError naming the bad field.

    Order: structure (ids, dtypes, shapes, byte lengths, unique names), then the checksum over the
    bytes exactly as received, and only then dequantisation, so no work is spent on corrupt data.
    """
    for name in ("bundle_id", "model_id", "base_version"):
        if not getattr(msg, name):
            raise IntegrityError(f"{name}: empty")
    if msg.expires_at_ms < 0:
        raise IntegrityError(f"expires_at_ms: negative ({msg.expires_at_ms})")

    slots: list[tuple[str, EncodedTensor, EncodedTensor]] = []
    seen: set[str] = set()
    for i, s in enumerate(msg.slots):
        where = f"slots[{i}]"
        if not s.slot:
            raise IntegrityError(f"{where}.slot: empty")
        if s.slot in seen:
            raise IntegrityError(f"{where}.slot: duplicate slot {s.slot!r}")
        seen.add(s.slot)
        where = f"slots[{i}] ({s.slot[:64]!r})"  # cap: the name itself may be corrupt
        a = _tensor_from_proto(s.a, f"{where}.a")
        b = _tensor_from_proto(s.b, f"{where}.b")
        if a.shape[1] != b.shape[0]:
            raise IntegrityError(f"{where}: rank mismatch, A is {list(a.shape)} but B is {list(b.shape)}")
        slots.append((s.slot, a, b))

    masks: list[tuple[str, int, bytes]] = []
    seen = set()
    for i, m in enumerate(msg.masks):
        where = f"masks[{i}]"
        if not m.group:
            raise IntegrityError(f"{where}.group: empty")
        if m.group in seen:
            raise IntegrityError(f"{where}.group: duplicate group {m.group!r}")
        seen.add(m.group)
        if len(m.bits) != (m.n_units + 7) // 8:
            raise IntegrityError(f"{where}.bits: {len(m.bits)} bytes cannot hold exactly {m.n_units} units")
        # Padding bits must be zero: otherwise two different byte strings would mean the same mask.
        if m.n_units % 8 and m.bits[-1] >> (m.n_units % 8):
            raise IntegrityError(f"{where}.bits: padding bits after unit {m.n_units - 1} are set")
        masks.append((m.group, m.n_units, m.bits))

    if len(msg.checksum) != 32:
        raise IntegrityError(f"checksum: expected 32 bytes of SHA-256, got {len(msg.checksum)}")
    expected = payload_checksum(
        msg.bundle_id, msg.model_id, msg.base_version, msg.created_at_ms, msg.expires_at_ms, slots, masks,
        msg.device_id,
    )
    if not hmac.compare_digest(expected, msg.checksum):
        raise IntegrityError("checksum: does not match the payload (bundle corrupted in transit or at rest)")

    factors = {
        name: (_decode_tensor(a, f"slots[{i}].a"), _decode_tensor(b, f"slots[{i}].b"))
        for i, (name, a, b) in enumerate(slots)
    }
    return DeltaBundle(
        model_id=msg.model_id,
        base_version=msg.base_version,
        factors=factors,
        masks={group: unpack_mask(bits, n) for group, n, bits in masks},
        bundle_id=msg.bundle_id,
        created_at_ms=msg.created_at_ms,
        expires_at_ms=msg.expires_at_ms,
        device_id=msg.device_id,
    )


def decode_bundle(data: bytes) -> DeltaBundle:
    """Parse and validate a serialized paramcast.v1.DeltaBundle; any failure is an IntegrityError."""
    msg = pb.DeltaBundle()
    try:
        msg.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise IntegrityError(f"bundle: not a valid DeltaBundle message ({exc})") from None
    return bundle_from_proto(msg)


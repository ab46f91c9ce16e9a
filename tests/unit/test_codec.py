"""Bundle codec: exact round trips for every encoding, and corrupt bytes always become IntegrityError."""

from __future__ import annotations

import hashlib
import struct

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from paramcast.common.bundle import (
    ENCODINGS,
    INT8_FLUSH,
    BundleBatch,
    DeltaBundle,
    EncodedTensor,
    check_bundle_for,
    dequantize,
    pack_mask,
    pack_mask_stack,
    payload_checksum,
    quantize,
    quantize_stack,
    unpack_mask,
)
from paramcast.common.errors import DeviceMismatch, IntegrityError, InvalidInput, VersionMismatch
from paramcast.common.serde import (
    batch_to_proto,
    bundle_from_proto,
    bundle_to_proto,
    decode_bundle,
    encode_bundle,
    encoding_from_proto,
    encoding_to_proto,
)
from paramcast.v1 import param_service_pb2 as pb

# Hypothesis runs on a shared 2-core machine: no per-example deadline, a moderate example count.
settings.register_profile(
    "paramcast", deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("paramcast")

FP16_MAX = 65504.0

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=8)


def matrices(max_abs: float | None = None, max_side: int = 6):
    """Finite float32 (rows, cols) arrays, zero-sized sides included; optionally bounded."""
    elements = st.floats(
        min_value=-max_abs if max_abs is not None else None,
        max_value=max_abs,
        allow_nan=False,
        allow_infinity=False,
        width=32,
    )
    shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=max_side)
    return hnp.arrays(np.float32, shapes, elements=elements)


@st.composite
def bundles(draw, max_abs: float | None = FP16_MAX) -> DeltaBundle:
    """Random bundles: 0-3 slots with consistent (d, r) x (r, k) factors, 0-2 masks; factor values
    finite and bounded by max_abs (None: any finite float32)."""
    factors = {}
    for slot in draw(st.lists(names, max_size=3, unique=True)):
        d, r, k = (draw(st.integers(0, 5)) for _ in range(3))
        lo, hi = (-max_abs, max_abs) if max_abs is not None else (None, None)
        elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)
        a = draw(hnp.arrays(np.float32, (d, r), elements=elements))
        b = draw(hnp.arrays(np.float32, (r, k), elements=elements))
        factors[slot] = (a, b)
    masks = {
        group: draw(hnp.arrays(np.bool_, draw(st.integers(0, 20))))
        for group in draw(st.lists(names, max_size=2, unique=True))
    }
    return DeltaBundle(
        model_id=draw(names),
        base_version=draw(names),
        factors=factors,
        masks=masks,
        bundle_id=draw(names),
        created_at_ms=draw(st.integers(-(2**63), 2**63 - 1)),
        expires_at_ms=draw(st.integers(0, 2**63 - 1)),
    )


def small_bundle() -> DeltaBundle:
    rng = np.random.default_rng(7)
    return DeltaBundle(
        model_id="sasrec-ml1m",
        base_version="v3",
        factors={
            "head.0": (rng.normal(size=(4, 2)), rng.normal(size=(2, 3))),
            "head.1": (np.zeros((2, 1)), rng.normal(size=(1, 2))),
        },
        masks={"ffn": rng.random(11) > 0.5},
        bundle_id="b-1",
        created_at_ms=1_700_000_000_000,
        expires_at_ms=1_700_000_600_000,
        device_id="device-17",
    )


def assert_same_metadata(x: DeltaBundle, y: DeltaBundle) -> None:
    assert (x.bundle_id, x.model_id, x.base_version) == (y.bundle_id, y.model_id, y.base_version)
    assert (x.created_at_ms, x.expires_at_ms) == (y.created_at_ms, y.expires_at_ms)
    assert x.masks.keys() == y.masks.keys()
    for group in x.masks:
        assert x.masks[group].dtype == bool and np.array_equal(x.masks[group], y.masks[group])


def assert_bit_identical(x: DeltaBundle, y: DeltaBundle) -> None:
    assert x.factors.keys() == y.factors.keys()
    for slot in x.factors:
        for u, v in zip(x.factors[slot], y.factors[slot], strict=True):
            assert u.dtype == v.dtype == np.float32 and u.shape == v.shape
            assert u.tobytes() == v.tobytes(), slot  # bit-exact, signed zeros included


def reseal(msg: pb.DeltaBundle) -> pb.DeltaBundle:
    """Recompute msg.checksum from its fields as they stand, so a test can reach the checks that
    run after the checksum (values, masks) with deliberately bad content."""

    def tensor(t: pb.Tensor) -> EncodedTensor:
        dtype = {1: "fp32", 2: "fp16", 3: "int8"}[t.dtype]
        return EncodedTensor(dtype, tuple(t.shape), t.data, t.row_scales)

    msg.checksum = payload_checksum(
        msg.bundle_id,
        msg.model_id,
        msg.base_version,
        msg.created_at_ms,
        msg.expires_at_ms,
        [(s.slot, tensor(s.a), tensor(s.b)) for s in msg.slots],
        [(m.group, m.n_units, m.bits) for m in msg.masks],
        msg.device_id,
    )
    return msg


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@given(bundles(max_abs=None))
def test_fp32_round_trip_is_bit_exact(bundle):
    decoded = decode_bundle(encode_bundle(bundle, "fp32"))
    assert_same_metadata(bundle, decoded)
    assert_bit_identical(bundle, decoded)


@pytest.mark.parametrize("encoding", ["int8", "fp16"])
@given(bundle=bundles())
def test_lossy_round_trip_equals_local_quantization_and_is_idempotent(encoding, bundle):
    raw = encode_bundle(bundle, encoding)
    decoded = decode_bundle(raw)
    assert_same_metadata(bundle, decoded)
    # What the device decodes is exactly what bundle.quantized() predicts on the cloud side...
    assert_bit_identical(bundle.quantized(encoding), decoded)
    # ...and sending the decoded bundle again reproduces the same bytes.
    assert encode_bundle(decoded, encoding) == raw


@given(matrices(max_abs=2.0**126, max_side=8))
def test_int8_error_is_at_most_half_a_scale_step(x):
    t = quantize(x, "int8")
    q = np.frombuffer(t.data, dtype=np.int8).reshape(x.shape)
    scales = np.frombuffer(t.row_scales, dtype="<f4").astype(np.float64)  # (rows,)
    assert q.min(initial=0) >= -127 and scales.shape == (x.shape[0],)
    absmax = np.abs(x.astype(np.float64)).max(axis=1, initial=0.0)
    # Rows below INT8_FLUSH (all-zero rows included) have scale 0 and decode to exact zeros; other
    # scales are max|row| / 127 rounded up by at most 2^-15 relative (16-bit significand).
    assert np.array_equal(scales == 0, absmax < INT8_FLUSH)
    kept = scales > 0
    assert np.all(scales[kept] * 127 >= absmax[kept])
    assert np.all(scales[kept] <= absmax[kept] / 127 * (1 + 2.0**-15))
    err = np.abs(x.astype(np.float64) - dequantize(t).astype(np.float64))  # (rows, cols)
    bound = np.where(scales > 0, scales / 2 * (1 + 1e-12), INT8_FLUSH)  # (rows,)
    assert np.all(err <= bound[:, None])


@given(matrices(max_abs=FP16_MAX))
def test_fp16_is_ieee_half_little_endian(x):
    t = quantize(x, "fp16")
    assert t.data == x.astype("<f2").tobytes() and t.row_scales == b""
    assert np.array_equal(dequantize(t), x.astype(np.float16).astype(np.float32))


def test_int8_known_layout():
    x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32)
    t = quantize(x, "int8")
    scale = np.frombuffer(t.row_scales, dtype="<f4")
    assert scale[1] == 0.0 and scale[0] >= 1 / 127
    # Row-major int8. The scale is 1/127 rounded up a little, so -0.5 / scale = -63.49... -> -63.
    assert list(np.frombuffer(t.data, dtype=np.int8)) == [127, -63, 32, 0, 0, 0]
    assert np.array_equal(dequantize(t)[1], np.zeros(3, dtype=np.float32))


@given(hnp.arrays(np.bool_, st.integers(0, 70)))
def test_masks_round_trip(mask):
    bits = pack_mask(mask)
    assert len(bits) == (mask.size + 7) // 8
    assert np.array_equal(unpack_mask(bits, mask.size), mask)


def test_mask_bit_order_is_little_endian():
    mask = np.zeros(10, dtype=bool)
    mask[[0, 9]] = True
    assert pack_mask(mask) == bytes([0b0000_0001, 0b0000_0010])


def test_checksum_follows_the_documented_canonical_payload():
    """An independent implementation of the layout documented in param_service.proto, as a device
    written in another language would build it, must produce the same checksum."""
    msg = bundle_to_proto(small_bundle(), "int8")

    def s(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<I", len(raw)) + raw

    def blob(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    def tensor(t: pb.Tensor) -> bytes:
        dims = b"".join(struct.pack("<q", n) for n in t.shape)
        return struct.pack("<II", t.dtype, len(t.shape)) + dims + blob(t.data) + blob(t.row_scales)

    payload = b"PCB2" + s(msg.bundle_id) + s(msg.model_id) + s(msg.base_version) + s(msg.device_id)
    payload += struct.pack("<qq", msg.created_at_ms, msg.expires_at_ms)
    payload += struct.pack("<I", len(msg.slots))
    payload += b"".join(s(x.slot) + tensor(x.a) + tensor(x.b) for x in msg.slots)
    payload += struct.pack("<I", len(msg.masks))
    payload += b"".join(s(m.group) + struct.pack("<I", m.n_units) + blob(m.bits) for m in msg.masks)
    assert msg.checksum == hashlib.sha256(payload).digest()
    assert [x.slot for x in msg.slots] == ["head.0", "head.1"]  # written sorted: deterministic bytes
    assert msg.device_id == "device-17"


def test_the_device_id_is_covered_by_the_checksum_and_checked_on_the_device():
    msg = bundle_to_proto(small_bundle(), "int8")
    assert decode_bundle(msg.SerializeToString()).device_id == "device-17"
    moved = pb.DeltaBundle()
    moved.CopyFrom(msg)
    moved.device_id = "device-18"  # another device's bundle relabelled: the checksum no longer verifies
    with pytest.raises(IntegrityError, match="checksum"):
        decode_bundle(moved.SerializeToString())
    bundle = decode_bundle(msg.SerializeToString())
    check_bundle_for(bundle, "sasrec-ml1m", "v3", "device-17")
    with pytest.raises(DeviceMismatch, match="generated for 'device-17', not for this device 'device-18'"):
        check_bundle_for(bundle, "sasrec-ml1m", "v3", "device-18")
    unbound = small_bundle()
    unbound.device_id = ""
    with pytest.raises(DeviceMismatch, match="generated for no device"):
        check_bundle_for(decode_bundle(encode_bundle(unbound)), "sasrec-ml1m", "v3", "device-17")
    # A stacked batch bound to its devices encodes each bundle with its own id.
    batch = BundleBatch.stack([small_bundle(), small_bundle()]).bound_to(["a", "b"])
    assert [m.device_id for m in batch_to_proto(batch, "fp32")] == ["a", "b"]
    assert [b.device_id for b in batch.take([1]).unstack()] == ["b"]


# ---------------------------------------------------------------------------------------------
# Corrupt input never crashes and is never applied
# ---------------------------------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_random_bytes_raise_integrity_error(data):
    with pytest.raises(IntegrityError):
        decode_bundle(data)


@given(bundles(), st.sampled_from(ENCODINGS), st.data())
def test_truncated_bytes_raise_integrity_error(bundle, encoding, data):
    raw = encode_bundle(bundle, encoding)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(IntegrityError):
        decode_bundle(raw[:cut])


def flip_bit(raw: bytes, bit: int) -> bytes:
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def assert_flip_changes_nothing_or_is_caught(raw: bytes, bit: int) -> None:
    """A flipped bit either raises IntegrityError or leaves the decoded bundle exactly as sent.

    The second case exists because protobuf has redundant encodings: the 10th byte of a 64-bit
    varint (any negative int64, e.g. created_at_ms = -1) carries one value bit, and parsers ignore
    the other seven. Flipping those changes bytes but not a single decoded value.
    """
    original = decode_bundle(raw)
    try:
        decoded = decode_bundle(flip_bit(raw, bit))
    except IntegrityError:
        return
    assert_same_metadata(original, decoded)
    assert_bit_identical(original, decoded)


@given(bundles(), st.sampled_from(ENCODINGS), st.data())
def test_bit_flips_never_go_unnoticed(bundle, encoding, data):
    raw = encode_bundle(bundle, encoding)
    assert_flip_changes_nothing_or_is_caught(raw, data.draw(st.integers(0, 8 * len(raw) - 1)))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_single_bit_flip_of_a_bundle_is_detected(encoding):
    raw = encode_bundle(small_bundle(), encoding)  # all ints non-negative: no redundant bits
    survivors = []
    for bit in range(8 * len(raw)):
        try:
            decode_bundle(flip_bit(raw, bit))
            survivors.append(bit)
        except IntegrityError:
            pass
    assert survivors == []


def test_flips_in_a_negative_varint_decode_to_the_same_bundle():
    bundle = small_bundle()
    bundle.created_at_ms = -1
    raw = encode_bundle(bundle, "fp16")
    for bit in range(8 * len(raw)):
        assert_flip_changes_nothing_or_is_caught(raw, bit)


@given(bundles(), st.sampled_from(ENCODINGS), st.data())
def test_payload_bit_flips_are_caught_by_the_checksum(bundle, encoding, data):
    """Flipping a bit of tensor data, scales or mask bits keeps every length valid: only the
    checksum can notice, and it must."""
    msg = bundle_to_proto(bundle, encoding)
    fields = [(t, name) for s in msg.slots for t in (s.a, s.b) for name in ("data", "row_scales")]
    fields += [(m, "bits") for m in msg.masks]
    fields = [(owner, name) for owner, name in fields if getattr(owner, name)]
    assume(fields)
    owner, name = data.draw(st.sampled_from(fields))
    value = getattr(owner, name)
    setattr(owner, name, flip_bit(value, data.draw(st.integers(0, 8 * len(value) - 1))))
    with pytest.raises(IntegrityError, match="^checksum|^masks.*padding"):
        bundle_from_proto(msg)


def _valid_msg() -> pb.DeltaBundle:
    return bundle_to_proto(small_bundle(), "int8")


def _set_nan_scale(m: pb.DeltaBundle) -> None:
    m.slots[0].a.row_scales = struct.pack("<f", float("nan")) + m.slots[0].a.row_scales[4:]


def _set_inf_value(m: pb.DeltaBundle) -> None:
    m.slots[0].a.dtype = pb.FLOAT16
    m.slots[0].a.row_scales = b""
    m.slots[0].a.data = np.full((4, 2), np.inf, dtype="<f2").tobytes()


# (mutation, whether to recompute the checksum afterwards, expected start of the error message)
MUTATIONS = [
    (lambda m: setattr(m, "base_version", ""), False, "base_version"),
    (lambda m: setattr(m, "bundle_id", ""), False, "bundle_id"),
    (lambda m: setattr(m, "expires_at_ms", -5), False, "expires_at_ms"),
    (
        lambda m: setattr(m.slots[0].a, "dtype", pb.DATA_TYPE_UNSPECIFIED),
        False,
        "slots[0] ('head.0').a.dtype",
    ),
    (lambda m: setattr(m.slots[0].a, "dtype", 9), False, "slots[0] ('head.0').a.dtype"),
    (lambda m: m.slots[0].b.shape.append(1), False, "slots[0] ('head.0').b.shape"),
    (lambda m: m.slots[0].b.shape.__setitem__(0, -2), False, "slots[0] ('head.0').b.shape"),
    (lambda m: m.slots[0].b.shape.__setitem__(1, 2**40), False, "slots[0] ('head.0').b.shape"),
    (lambda m: setattr(m.slots[0].a, "data", m.slots[0].a.data[:-1]), False, "slots[0] ('head.0').a.data"),
    (lambda m: setattr(m.slots[1].b, "row_scales", b""), False, "slots[1] ('head.1').b.row_scales"),
    (lambda m: m.slots[1].a.shape.__setitem__(1, 2), False, "slots[1] ('head.1').a.data"),
    (lambda m: setattr(m.slots[1], "slot", "head.0"), False, "slots[1].slot: duplicate"),
    (lambda m: setattr(m.masks[0], "n_units", 20), False, "masks[0].bits"),
    (lambda m: setattr(m.masks[0], "bits", m.masks[0].bits[:1] + b"\xff"), False, "masks[0].bits: padding"),
    (lambda m: setattr(m, "checksum", m.checksum[:31]), False, "checksum"),
    (_set_nan_scale, True, "slots[0].a.row_scales"),
    (_set_inf_value, True, "slots[0].a.data"),
]


@pytest.mark.parametrize("mutate, resealed, where", MUTATIONS)
def test_malformed_fields_are_named_in_the_error(mutate, resealed, where):
    msg = _valid_msg()
    mutate(msg)
    if resealed:
        reseal(msg)
    with pytest.raises(IntegrityError) as info:
        bundle_from_proto(msg)
    assert str(info.value).startswith(where), str(info.value)


tensor_fields = st.fixed_dictionaries(
    {
        "dtype": st.integers(0, 5),
        "shape": st.lists(st.integers(-3, 6), max_size=3),
        "data": st.binary(max_size=64),
        "row_scales": st.binary(max_size=24),
    }
)


@given(
    st.lists(st.tuples(names, tensor_fields, tensor_fields), max_size=3),
    st.lists(st.tuples(names, st.integers(0, 40), st.binary(max_size=6)), max_size=2),
    st.booleans(),
)
def test_arbitrary_messages_decode_or_raise_integrity_error(slots, masks, resealed):
    """Whatever the field values, a message either decodes to a sane bundle or raises IntegrityError."""
    msg = pb.DeltaBundle(bundle_id="b", model_id="m", base_version="v", checksum=b"\0" * 32)
    for name, a, b in slots:
        msg.slots.add(slot=name, a=pb.Tensor(**a), b=pb.Tensor(**b))
    for group, n_units, bits in masks:
        msg.masks.add(group=group, n_units=n_units, bits=bits)
    if resealed and all(t.dtype in (1, 2, 3) for s in msg.slots for t in (s.a, s.b)):
        reseal(msg)
    try:
        bundle = bundle_from_proto(msg)
    except IntegrityError:
        return
    for a, b in bundle.factors.values():
        assert np.isfinite(a).all() and np.isfinite(b).all() and a.shape[1] == b.shape[0]


# ---------------------------------------------------------------------------------------------
# Version checks, metadata, inputs
# ---------------------------------------------------------------------------------------------


def test_wrong_base_version_or_model_is_refused():
    bundle = decode_bundle(encode_bundle(small_bundle()))
    check_bundle_for(bundle, "sasrec-ml1m", "v3")  # matches: no error
    with pytest.raises(VersionMismatch, match="base version 'v3'.*holds 'v2'"):
        check_bundle_for(bundle, "sasrec-ml1m", "v2")
    with pytest.raises(VersionMismatch, match="model 'sasrec-ml1m'.*runs 'other'"):
        check_bundle_for(bundle, "other", "v3")


def test_expiry_and_parameter_count():
    bundle = small_bundle()
    assert bundle.n_parameters() == 4 * 2 + 2 * 3 + 2 * 1 + 1 * 2
    assert not bundle.is_expired(bundle.expires_at_ms - 1)
    assert bundle.is_expired(bundle.expires_at_ms)
    assert not DeltaBundle("m", "v", {}, expires_at_ms=0).is_expired(2**62)


def test_encoding_enum_mapping():
    for name in ENCODINGS:
        assert encoding_from_proto(encoding_to_proto(name)) == name
    assert encoding_from_proto(pb.ENCODING_UNSPECIFIED) == "int8"
    with pytest.raises(InvalidInput):
        encoding_to_proto("int4")
    with pytest.raises(InvalidInput):
        encoding_from_proto(42)


@pytest.mark.parametrize(
    "x, encoding",
    [
        (np.ones((2, 2)), "int4"),
        (np.ones((2, 2, 2)), "fp32"),
        (np.array([[np.nan, 1.0]]), "int8"),
        (np.array([[1e5, 1.0]]), "fp16"),
        (np.array([[np.finfo(np.float32).max]]), "int8"),
        (np.array([[65520.0]]), "fp16"),
        (np.array([[1e39]]), "fp32"),
    ],
)
def test_quantize_rejects_bad_input(x, encoding):
    with pytest.raises(InvalidInput):
        quantize(x, encoding)


def test_bundle_rejects_inconsistent_factors():
    with pytest.raises(InvalidInput, match="head"):
        DeltaBundle("m", "v", {"head": (np.zeros((4, 2)), np.zeros((3, 5)))})


# ---------------------------------------------------------------------------------------------
# Batched encoding: the server encodes a whole generator batch at once; every message must be the
# one bundle_to_proto gives for that bundle alone, byte for byte.
# ---------------------------------------------------------------------------------------------


def wire(messages) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


def one_by_one(bundles_: list[DeltaBundle], encoding: str) -> list[bytes]:
    return [encode_bundle(b, encoding) for b in bundles_]


@st.composite
def same_layout_bundles(draw, with_masks: bool) -> list[DeltaBundle]:
    """0-5 bundles sharing model, base version, slot shapes and mask sizes (one generator batch),
    with values from subnormal to the float16 limit, so int8 rows of every scale regime occur."""
    shapes = {slot: tuple(draw(st.integers(0, 5)) for _ in range(3))
              for slot in draw(st.lists(names, min_size=1, max_size=3, unique=True))}
    sizes = {g: draw(st.integers(0, 20)) for g in draw(st.lists(names, min_size=1, max_size=2, unique=True))}
    sizes = sizes if with_masks else {}
    elements = st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, allow_infinity=False, width=32)
    out = []
    for i in range(draw(st.integers(0, 5))):
        factors = {slot: (draw(hnp.arrays(np.float32, (d, r), elements=elements)),
                          draw(hnp.arrays(np.float32, (r, k), elements=elements)))
                   for slot, (d, r, k) in shapes.items()}
        masks = {g: draw(hnp.arrays(np.bool_, n)) for g, n in sizes.items()}
        out.append(DeltaBundle("m", "v1", factors, masks, bundle_id=f"b{i}", created_at_ms=1000 + i,
                               expires_at_ms=draw(st.integers(0, 2**40))))
    return out


@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("encoding", ENCODINGS)
@given(data=st.data())
def test_batched_encoding_is_byte_identical_to_one_by_one(encoding, with_masks, data):
    batch = data.draw(same_layout_bundles(with_masks))
    assume(batch)
    stacked = BundleBatch.stack(batch)
    assert stacked.encoded(encoding) == [b.encoded(encoding) for b in batch]
    assert wire(batch_to_proto(stacked, encoding)) == one_by_one(batch, encoding)


@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_generator_sized_batch_is_byte_identical(encoding, with_masks):
    """64 bundles of the default model's shapes (rank 4, (64, 4) x (4, 128) and (128, 4) x (4, 64)),
    including all-zero rows, rows below INT8_FLUSH and rows of very different magnitudes, so the
    batch's stacked rows would expose any scale shared across rows or bundles."""
    rng = np.random.default_rng(3)
    batch = []
    for i in range(64):
        factors = {}
        for slot, (d, k) in {"head.up": (64, 128), "head.down": (128, 64)}.items():
            a = rng.normal(size=(d, 4)) * 10.0 ** rng.integers(-6, 4, size=(d, 1))
            b = rng.normal(size=(4, k)) * 10.0 ** rng.integers(-6, 4, size=(4, 1))
            a[i % d] = 0.0
            b[i % 4] *= INT8_FLUSH / 4
            factors[slot] = (a, b)
        masks = {"head": rng.random(128) > 0.5, "block0.ffn": rng.random(61) > 0.5} if with_masks else {}
        batch.append(DeltaBundle("m", "v1", factors, masks, expires_at_ms=i))
    want = one_by_one(batch, encoding)
    assert len(set(want)) == 64  # distinct bundles: a mix-up between them could not pass unnoticed
    stacked = BundleBatch.stack(batch)
    assert wire(batch_to_proto(stacked, encoding)) == want
    # Per-bundle encodings within one batch (devices in one generator pass asking for different ones).
    per_bundle = [ENCODINGS[i % 3] for i in range(64)]
    assert wire(batch_to_proto(stacked, per_bundle)) == [
        encode_bundle(b, e) for b, e in zip(batch, per_bundle, strict=True)
    ]


@given(stack=hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=40),
                        elements=st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=32)))
def test_quantize_stack_is_quantize_per_tensor(stack):
    """Narrow (rank-like) and wide rows take different code paths for the row maximum; both exact."""
    for encoding in ENCODINGS:
        assert quantize_stack(stack, encoding) == [quantize(x, encoding) for x in stack]


@given(hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=30)))
def test_pack_mask_stack_is_pack_mask_per_row(masks):
    assert pack_mask_stack(masks) == [pack_mask(m) for m in masks]


def test_batch_take_and_unstack_keep_each_bundle():
    rng = np.random.default_rng(5)
    originals = [DeltaBundle("m", "v1", {"s": (rng.normal(size=(3, 2)), rng.normal(size=(2, 4)))},
                             {"g": rng.random(9) > 0.5}, bundle_id=f"b{i}", created_at_ms=i, expires_at_ms=10 + i)
                 for i in range(4)]
    batch = BundleBatch.stack(originals)
    assert len(batch) == 4 and batch.factors["s"][0].shape == (4, 3, 2) and batch.masks["g"].shape == (4, 9)
    for got, want in zip(batch.take([2, 0]).unstack(), [originals[2], originals[0]], strict=True):
        assert_same_metadata(got, want)
        assert_bit_identical(got, want)


def test_fresh_batch_has_new_ids_and_expiry():
    batch = BundleBatch.fresh("m", "v1", {"s": (np.zeros((3, 5, 2)), np.zeros((3, 2, 4)))}, ttl_ms=500)
    assert len(batch) == 3 and len(set(batch.bundle_ids)) == 3
    assert all(e == c + 500 for c, e in zip(batch.created_at_ms, batch.expires_at_ms, strict=True))
    assert BundleBatch.fresh("m", "v1", {"s": (np.zeros((2, 5, 2)), np.zeros((2, 2, 4)))}).expires_at_ms == [0, 0]


def test_batched_encoding_refuses_what_it_cannot_stack_or_encode():
    a = DeltaBundle("m", "v1", {"s": (np.ones((3, 2)), np.ones((2, 4)))})
    wider = DeltaBundle("m", "v1", {"s": (np.ones((3, 2)), np.ones((2, 5)))})
    with pytest.raises(InvalidInput, match=r"bundles\[1\]"):
        BundleBatch.stack([a, wider])  # the explicit batch type holds one layout only
    with pytest.raises(InvalidInput, match="2 encodings for a batch of 3"):
        batch_to_proto(BundleBatch.stack([a, a, a]), ["int8", "fp16"])
    with pytest.raises(InvalidInput, match="unknown encoding 'int4'"):
        BundleBatch.stack([a]).encoded("int4")
    with pytest.raises(InvalidInput, match="unknown encoding 'int4'"):
        a.encoded("int4")
    with pytest.raises(InvalidInput, match="A \\(2, d, r\\)"):
        BundleBatch("m", "v1", {"s": (np.ones((3, 3, 2)), np.ones((3, 2, 4)))}, {}, ["x", "y"], [0, 0], [0, 0])
    stack = np.ones((3, 2, 2), dtype=np.float32)
    stack[2, 1, 0] = np.nan
    with pytest.raises(InvalidInput, match="tensor 2 of 3: contains NaN"):
        quantize_stack(stack, "int8")
    stack[2, 1, 0] = 1e5
    with pytest.raises(InvalidInput, match="tensor 2 of 3: values exceed the float16 range"):
        quantize_stack(stack, "fp16")

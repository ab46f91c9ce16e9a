"""A ParamCast device written from docs/PROTOCOL.md alone, as a third party would write one.

It imports nothing from ParamCast but the generated gRPC stubs (`paramcast.v1`): numpy, ONNX
Runtime, grpc and the standard library do the rest. The ONNX graph is read with a few lines of
protobuf wire-format parsing (no `onnx` package), and masks are applied by zeroing the dropped
units' weights (PROTOCOL.md section 5.3, last paragraph) rather than by editing the graph.
tests/integration/test_conformance.py checks that it reproduces ParamCast's own runtime.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
import tarfile

import numpy as np
import onnxruntime as ort

from paramcast.v1 import param_service_pb2 as pb

# --------------------------------------------------------------------------------- section 3


class BadBundle(Exception):
    pass


_ELEMENT = {1: ("<f4", 4), 2: ("<f2", 2), 3: ("i1", 1)}  # DataType number -> (numpy dtype, bytes)


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _blob(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _tensor_bytes(t) -> bytes:
    return (struct.pack("<II", t.dtype, len(t.shape)) + struct.pack(f"<{len(t.shape)}q", *t.shape)
            + _blob(t.data) + _blob(t.row_scales))


def checksum(msg) -> bytes:
    """Section 3.3."""
    out = [b"PCB2", _str(msg.bundle_id), _str(msg.model_id), _str(msg.base_version), _str(msg.device_id),
           struct.pack("<qq", msg.created_at_ms, msg.expires_at_ms), struct.pack("<I", len(msg.slots))]
    for s in msg.slots:
        out += [_str(s.slot), _tensor_bytes(s.a), _tensor_bytes(s.b)]
    out.append(struct.pack("<I", len(msg.masks)))
    for m in msg.masks:
        out += [_str(m.group), struct.pack("<I", m.n_units), _blob(m.bits)]
    return hashlib.sha256(b"".join(out)).digest()


def decode_tensor(t) -> np.ndarray:
    """Section 3.1."""
    if t.dtype not in _ELEMENT or len(t.shape) != 2:
        raise BadBundle("tensor dtype or rank")
    dtype, size = _ELEMENT[t.dtype]
    rows, cols = t.shape
    if len(t.data) != rows * cols * size:
        raise BadBundle("tensor data length")
    values = np.frombuffer(t.data, dtype=dtype).reshape(rows, cols).astype(np.float32)
    if t.dtype == 3:
        if len(t.row_scales) != 4 * rows:
            raise BadBundle("row_scales length")
        scales = np.frombuffer(t.row_scales, dtype="<f4").astype(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise BadBundle("row scales")
        values = values * scales[:, None]
    elif t.row_scales:
        raise BadBundle("row_scales on a float tensor")
    if not np.isfinite(values).all():
        raise BadBundle("non-finite values")
    return values


def decode_bundle(msg, model_id: str, base_version: str, now_ms: int) -> tuple[dict, dict]:
    """A verified bundle -> ({slot: (A, B)}, {group: bool mask}); BadBundle otherwise (section 2.1)."""
    if len(msg.checksum) != 32 or not hmac.compare_digest(checksum(msg), msg.checksum):
        raise BadBundle("checksum")
    if (msg.model_id, msg.base_version) != (model_id, base_version):
        raise BadBundle("another model or base version")
    if msg.expires_at_ms and msg.expires_at_ms <= now_ms:
        raise BadBundle("expired")
    factors = {s.slot: (decode_tensor(s.a), decode_tensor(s.b)) for s in msg.slots}
    masks = {}
    for m in msg.masks:  # section 3.2
        if len(m.bits) != (m.n_units + 7) // 8:
            raise BadBundle("mask length")
        bits = np.unpackbits(np.frombuffer(m.bits, dtype=np.uint8), bitorder="little")
        if bits[m.n_units:].any():
            raise BadBundle("mask padding bits")
        masks[m.group] = bits[:m.n_units].astype(bool)
    return factors, masks


# --------------------------------------------------------------------------------- section 2.2


def download(stub, model_id: str, metadata=()) -> dict[str, bytes]:
    """GetModel -> the package's files, every sha256 checked (chunks, archive, manifest entries)."""
    held, total, digest, version = b"", None, None, ""
    for msg in stub.GetModel(pb.GetModelRequest(model_id=model_id, version=version, offset=0), metadata=metadata,
                             timeout=60):
        assert hashlib.sha256(msg.data).digest() == msg.chunk_sha256 and msg.offset == len(held)
        held += msg.data
        total, digest = msg.total_size, msg.archive_sha256
    assert len(held) == total and hashlib.sha256(held).digest() == digest
    files = {}
    with tarfile.open(fileobj=io.BytesIO(held), mode="r:") as tar:
        for member in tar:
            assert member.isreg() and "/" not in member.name
            files[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"], name
    return files


# --------------------------------------------------------------------------------- reading ONNX


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def float_initializers(model: bytes, names: set[str]) -> dict[str, np.ndarray]:
    """The float32 initializers `names` of an ONNX model (ModelProto.graph = 7, GraphProto.initializer
    = 5, TensorProto: dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9)."""
    graph = next(v for n, w, v in _fields(model) if n == 7)
    out = {}
    for number, _, value in _fields(graph):
        if number != 5:
            continue
        dims, name, raw, floats, dtype = [], "", b"", b"", 0
        for n, w, v in _fields(value):
            if n == 1:
                if w == 2:  # packed
                    p = 0
                    while p < len(v):
                        d, p = _varint(v, p)
                        dims.append(d)
                else:
                    dims.append(v)
            elif n == 2:
                dtype = v
            elif n == 4:
                floats += v
            elif n == 8:
                name = v.decode()
            elif n == 9:
                raw = v
        if name in names:
            assert dtype == 1, f"{name} is not float32"
            out[name] = np.frombuffer(raw or floats, dtype="<f4").reshape(dims).copy()
    return out


# --------------------------------------------------------------------------------- section 5


class ProtocolDevice:
    def __init__(self, files: dict[str, bytes]):
        self.manifest = json.loads(files["manifest.json"])
        self.model = files["model.onnx"]
        self.vocabulary = json.loads(files["items.json"]) if "vocabulary" in self.manifest else None
        self.max_len = self.manifest["max_len"]
        self.slots = self.manifest["slots"]
        self.groups = self.manifest["unit_groups"]
        self.base = ort.InferenceSession(self.model, providers=["CPUExecutionProvider"])
        self.session = self.base
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.dropped: dict[str, np.ndarray] = {}  # group -> indices of dropped units

    def history(self, items) -> np.ndarray:
        """Section 5.1: the last max_len items, left-padded with 0 -> (1, max_len) int64."""
        tail = list(items)[-self.max_len:]
        return np.array([[0] * (self.max_len - len(tail)) + [int(i) for i in tail]], dtype=np.int64)

    def apply(self, factors: dict, masks: dict) -> None:
        """Sections 5.2 and 5.3 (masks by zeroing the dropped units' weights and factor entries)."""
        self.factors = factors
        self.dropped = {g: np.flatnonzero(~m) for g, m in masks.items() if not m.all()}
        if not self.dropped:
            self.session = self.base
            return
        names = {c["name"] for g in self.dropped for c in self.groups[g]["initializers"]}
        weights = float_initializers(self.model, names)
        options = ort.SessionOptions()
        # ONNX Runtime's constant folding reads the file's weights, not overridden initializers (it
        # would fold Transpose(weight) from the original values), so this session runs unoptimised.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._keep_alive = []
        for group, idx in self.dropped.items():
            for cut in self.groups[group]["initializers"]:
                w = weights[cut["name"]]
                index = [slice(None)] * w.ndim
                index[cut["axis"]] = idx
                w[tuple(index)] = 0.0
        for name, w in weights.items():
            value = ort.OrtValue.ortvalue_from_numpy(w)
            self._keep_alive.append(value)
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])

    def feeds(self) -> dict[str, np.ndarray]:
        out = {}
        for name, slot in self.slots.items():
            if name in self.factors:
                a, b = self.factors[name]
                out[slot["inputs"]["A"]] = a.reshape(1, *a.shape).copy()
                out[slot["inputs"]["B"]] = b.reshape(1, *b.shape).copy()
            else:  # rank 0: this slot unchanged
                out[slot["inputs"]["A"]] = np.zeros((1, slot["d_in"], 0), np.float32)
                out[slot["inputs"]["B"]] = np.zeros((1, 0, slot["d_out"]), np.float32)
        for group, idx in self.dropped.items():
            for cut in self.groups[group]["adapter_inputs"]:
                index = [slice(None)] * 3
                index[cut["axis"]] = idx
                out[cut["name"]][tuple(index)] = 0.0
        return out

    def score(self, items, candidates) -> np.ndarray:
        feeds = {"history": self.history(items), "candidates": np.asarray(candidates, np.int64)[None],
                 **self.feeds()}
        return self.session.run(["scores"], feeds)[0][0]

"""Conformance: a device written from docs/PROTOCOL.md alone (tests/integration/protocol_device.py,
numpy + ONNX Runtime + the generated stubs) decodes live server bundles and reproduces ParamCast's
runtime within 1e-5: base model, adapted, slimmed."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import grpc
import numpy as np
import protocol_device as third_party
import pytest

from paramcast.cloud.service.server import ServerThread, load_models
from paramcast.common.data import load_interactions
from paramcast.common.package import DevicePackage
from paramcast.common.serde import bundle_from_proto
from paramcast.device.runtime import DeviceRuntime
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def test_the_third_party_device_imports_nothing_of_paramcast_but_the_stubs():
    tree = ast.parse(Path(third_party.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {m for m in imported if m.split(".")[0] == "paramcast"}
    assert ours == {"paramcast.v1"}
    assert not {m for m in imported if m.split(".")[0] in ("onnx", "torch")}


@pytest.fixture(scope="module")
def live(trained_model):
    with ServerThread(load_models([trained_model])) as st:
        channel = grpc.insecure_channel(f"127.0.0.1:{st.port}")
        yield pb_grpc.ParamServiceStub(channel), DevicePackage.load(trained_model / "package")
        channel.close()


@pytest.fixture(scope="module")
def users(shared_data):
    log = load_interactions(shared_data / "ml-100k")
    rng = np.random.default_rng(3)
    out = []
    for u in rng.choice(log.n_users, 4, replace=False):
        seq = log.sequences[u].astype(np.int64)
        out.append((seq[:-1], np.concatenate([seq[-1:], rng.integers(1, log.n_items + 1, 100)])))
    return out


@pytest.mark.parametrize(("encoding", "keep_ratio"), [(pb.ENCODING_INT8, 0.0), (pb.ENCODING_FP16, 0.0),
                                                      (pb.ENCODING_FP32, 0.5), (pb.ENCODING_INT8, 0.25)])
def test_a_device_written_from_the_protocol_reproduces_the_runtime(live, users, encoding, keep_ratio):
    stub, package = live
    files = third_party.download(stub, package.model_id)
    device = third_party.ProtocolDevice(files)
    assert files["model.onnx"] == package.model_bytes
    for history, candidates in users:
        device.apply({}, {})
        reference = DeviceRuntime(package)
        np.testing.assert_allclose(device.score(history, candidates), reference.score(history, candidates),
                                   atol=1e-5, rtol=0)

        # catalogue ids through the package's own vocabulary, as a device with its own catalogue sends them
        window = [device.vocabulary[int(i)] for i in history[-50:]]
        response = stub.Generate(pb.GenerateRequest(model_id=package.model_id, base_version=package.base_version,
                                                    device_id="third-party", catalogue_window=window,
                                                    encoding=encoding, keep_ratio=keep_ratio), timeout=30)
        factors, masks = third_party.decode_bundle(response.bundle, package.model_id, package.base_version,
                                                   int(time.time() * 1000))
        assert bool(masks) == bool(keep_ratio)
        device.apply(factors, masks)
        reference.apply(bundle_from_proto(response.bundle))
        if keep_ratio:
            assert reference.active_keep, "the runtime runs a physically slimmed session"
        expected = reference.score(history, candidates)
        got = device.score(history, candidates)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert np.abs(expected - DeviceRuntime(package).score(history, candidates)).max() > 1e-3


def test_the_third_party_device_refuses_what_the_protocol_forbids(live, users):
    stub, package = live
    history, _ = users[0]
    response = stub.Generate(pb.GenerateRequest(model_id=package.model_id, base_version=package.base_version,
                                                device_id="third-party", window=history[-20:].tolist()), timeout=30)
    now = int(time.time() * 1000)
    bundle = response.bundle
    third_party.decode_bundle(bundle, package.model_id, package.base_version, now)
    tampered = pb.DeltaBundle()
    tampered.CopyFrom(bundle)
    tampered.slots[0].a.data = bytes([tampered.slots[0].a.data[0] ^ 1]) + tampered.slots[0].a.data[1:]
    with pytest.raises(third_party.BadBundle, match="checksum"):
        third_party.decode_bundle(tampered, package.model_id, package.base_version, now)
    with pytest.raises(third_party.BadBundle, match="base version"):
        third_party.decode_bundle(bundle, package.model_id, "0" * 16, now)

"""The wire contract: generated stubs are current, and the service has the agreed shape."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from paramcast.common.bundle import DTYPE_CODES, ENCODINGS
from paramcast.common.serde import SERVICE_NAME, encoding_to_proto
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVICE = pb.DESCRIPTOR.services_by_name["ParamService"]
needs_protoc = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools missing"
)


def test_service_has_generate_streaming_get_model_and_list_models():
    assert SERVICE_NAME == SERVICE.full_name == "paramcast.v1.ParamService"
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in SERVICE.methods}
    assert kinds == {"Generate": (False, False), "GetModel": (False, True), "ListModels": (False, False)}


def test_messages_are_named_after_their_rpc():
    for method in SERVICE.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_no_tensor_travels_as_repeated_floats():
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for f in message.fields:
            is_float = f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
            assert not (is_float and f.is_repeated), f"{message.name}.{f.name}"
    tensor = {f.name: f.type for f in pb.Tensor.DESCRIPTOR.fields}
    assert tensor == {
        "dtype": FieldDescriptor.TYPE_ENUM,
        "shape": FieldDescriptor.TYPE_INT64,
        "data": FieldDescriptor.TYPE_BYTES,
        "row_scales": FieldDescriptor.TYPE_BYTES,
    }


def test_codec_constants_match_the_proto_enums():
    # DTYPE_CODES enter the checksum; a renumbered enum must break this test, not devices.
    assert DTYPE_CODES == {"fp32": pb.FLOAT32, "fp16": pb.FLOAT16, "int8": pb.INT8_ROW_SCALED}
    assert set(pb.DataType.values()) == {pb.DATA_TYPE_UNSPECIFIED, *DTYPE_CODES.values()}
    assert {encoding_to_proto(e) for e in ENCODINGS} == set(pb.Encoding.values()) - {pb.ENCODING_UNSPECIFIED}


def test_stub_exposes_both_rpcs_with_their_streaming_kind():
    with grpc.insecure_channel("localhost:1") as channel:  # never connected: stubs are lazy
        stub = pb_grpc.ParamServiceStub(channel)
        assert isinstance(stub.Generate, grpc.UnaryUnaryMultiCallable)
        assert isinstance(stub.GetModel, grpc.UnaryStreamMultiCallable)
    assert hasattr(pb_grpc, "add_ParamServiceServicer_to_server")


@needs_protoc
def test_committed_stubs_are_up_to_date():
    result = subprocess.run([str(REPO / "tools" / "check_protos.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_protoc
def test_check_protos_fails_on_a_stale_stub(tmp_path):
    # Run the check on a copy whose generated module was edited by hand.
    shutil.copytree(REPO / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    stub = tmp_path / "protos" / "paramcast" / "v1" / "param_service_pb2.py"
    stub.write_text(stub.read_text() + "# edited by hand\n")
    result = subprocess.run([str(tmp_path / "tools" / "check_protos.sh")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "stale generated file: protos/paramcast/v1/param_service_pb2.py" in result.stderr
    assert "+# edited by hand" not in result.stdout and "-# edited by hand" in result.stdout

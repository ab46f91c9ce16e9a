"""The device client's pieces that need no server: retry configuration, error mapping, the
resumable download's checks, and that the whole device side runs without torch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time

import grpc
import pytest
from device_fixtures import tiny_package
from without_torch import LOADED, run_without_torch

from paramcast.common.errors import (
    CloudUnavailable,
    DeadlineExpired,
    DeviceRateLimited,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    OutOfRange,
    Overloaded,
    PackageTooLarge,
    PermissionDenied,
    RateLimited,
    RemoteError,
    ShuttingDown,
    Unauthenticated,
    VersionMismatch,
)
from paramcast.common.package import DevicePackage, pack_package, unpack_package
from paramcast.common.status import status_of, trailers_of
from paramcast.device.client import ParamClient, RetryPolicy, cloud_error, service_config
from paramcast.device.download import Download, next_attempt
from paramcast.v1 import param_service_pb2 as pb


def test_service_config_retries_unavailable_with_exponential_backoff():
    config = json.loads(service_config(RetryPolicy(max_attempts=4, initial_backoff_s=0.25, max_backoff_s=3)))
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "paramcast.v1.ParamService"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.250s", "maxBackoff": "3.000s", "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "details", trailers=()):
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAVAILABLE, CloudUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, CloudUnavailable),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, VersionMismatch),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimited),
        (grpc.StatusCode.INTERNAL, RemoteError),
    ],
)
def test_status_codes_become_typed_errors(code, error):
    err = cloud_error(FakeRpcError(code, "the reason"))
    assert isinstance(err, error) and err.code == code and "the reason" in str(err)



@pytest.mark.parametrize(("raised", "received"), [
    (OutOfRange("offset", "9 is beyond the end"), OutOfRange),
    (InvalidInput("window", "item id 0 is outside [1, 5]"), InvalidInput),
    (ModelNotFound("model_id: 'x' is not served here"), ModelNotFound),
    (VersionMismatch("base_version: not served"), VersionMismatch),
    (Unauthenticated("unknown device token"), Unauthenticated),
    (PermissionDenied("device_id: not these credentials"), PermissionDenied),
    (Overloaded("the generation queue is full"), RateLimited),
    (DeviceRateLimited("retry in 1500 ms", retry_after_s=1.5), DeviceRateLimited),
    (DeadlineExpired("the deadline passed"), CloudUnavailable),
    (ShuttingDown("the server is shutting down"), CloudUnavailable),
])
def test_one_table_maps_server_errors_to_status_codes_and_back(raised, received):
    """What the interceptor answers (status, message, trailers) turns back into the matching error."""
    code = status_of(raised)
    err = cloud_error(FakeRpcError(code, str(raised), trailers_of(raised)))
    assert type(err) is received and err.code == code and str(raised) in str(err)
    if isinstance(raised, DeviceRateLimited):
        assert dict(trailers_of(raised)) == {"retry-after-ms": "1500"} and err.retry_after_s == 1.5
    assert status_of(RuntimeError("boom")) is None and status_of(IntegrityError("corrupt package")) is None


def test_a_rate_limited_device_waits_out_the_servers_hint_without_calling(monkeypatch):
    client = ParamClient("127.0.0.1:1", device_id="d")
    calls = []

    async def refuse(request, **_):
        calls.append(request.device_id)
        raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [("retry-after-ms", "60000")])

    monkeypatch.setattr(client.aio.stub, "Generate", refuse)
    try:
        with pytest.raises(DeviceRateLimited) as first:
            client.generate([1], "m", "v")
        assert first.value.retry_after_s == 60.0 and first.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(DeviceRateLimited, match="wait") as again:
            client.generate([1], "m", "v")
        assert 59 < again.value.retry_after_s <= 60 and calls == ["d"]  # refused locally: no second call
        with pytest.raises(DeviceRateLimited):
            client.generate([1], "m", "v", device_id="other")  # another device still asks the server
        assert calls == ["d", "other"]
    finally:
        client.close()

def package_id() -> tuple[str, str]:
    package = DevicePackage.load(tiny_package())
    return package.model_id, package.base_version


def chunks(archive: bytes, size: int, version: str | None = None):
    model_id, base_version = package_id()
    sha = hashlib.sha256(archive).digest()
    for offset in range(0, len(archive), size):
        data = archive[offset:offset + size]
        yield pb.GetModelResponse(model_id=model_id, version=version or base_version, total_size=len(archive),
                                  archive_sha256=sha, offset=offset, data=data,
                                  chunk_sha256=hashlib.sha256(data).digest())


def test_download_writes_only_verified_contiguous_chunks_and_resumes(tmp_path):
    archive = pack_package(tiny_package())
    model_id, version = package_id()
    stream = list(chunks(archive, 8192))
    first = Download(tmp_path, model_id, "")
    for msg in stream[:3]:
        assert first.accept(msg) is False

    bad = pb.GetModelResponse()
    bad.CopyFrom(stream[3])
    bad.data = bad.data[:-1] + bytes([bad.data[-1] ^ 1])
    with pytest.raises(IntegrityError, match="sha256"):
        first.accept(bad)
    with pytest.raises(IntegrityError, match="expected 24576"):
        first.accept(stream[4])  # a gap
    other = list(chunks(archive[:-10], 8192, version="v2"))[3]
    with pytest.raises(IntegrityError, match="archive changed"):
        first.accept(other)

    resumed = Download(tmp_path, model_id, "")  # a later call (or process) picks up the partial file
    assert resumed.offset == 3 * 8192
    assert (resumed.version, resumed.offset) == (version, 3 * 8192)  # pinned to the version it started
    for msg in stream[3:]:
        resumed.accept(msg)
    package = resumed.finish()
    assert package.model_bytes == (tiny_package() / "model.onnx").read_bytes()
    assert not resumed.part.exists() and not resumed.meta_file.exists()
    # Asking again for the version now held stops after the first chunk.
    again = Download(tmp_path, model_id, "")
    assert again.accept(next(chunks(archive, 8192))) is True and again.held.base_version == version


def test_a_package_that_is_not_what_the_server_named_is_refused(tmp_path):
    archive = pack_package(tiny_package())
    model_id, _ = package_id()
    download = Download(tmp_path, model_id, "")
    for msg in chunks(archive, 65536, version="0000000000000000"):
        download.accept(msg)
    with pytest.raises(IntegrityError, match="is tiny"):
        download.finish()
    assert not (tmp_path / "packages" / f"{model_id}-0000000000000000").exists()


def test_a_corrupt_whole_archive_is_discarded(tmp_path):
    archive = pack_package(tiny_package())
    download = Download(tmp_path, package_id()[0], "")
    sha = hashlib.sha256(b"something else").digest()
    for msg in chunks(archive, 65536):
        msg.archive_sha256 = sha
        download.accept(msg)
    with pytest.raises(IntegrityError, match="archive sha256"):
        download.finish()
    assert download.offset == 0 and not download.part.exists()


def test_device_side_runs_without_torch(tmp_path):
    """client, store, agent, archive and policies import with torch (and the cloud side) blocked."""
    modules = "paramcast.device.agent, paramcast.device.client, paramcast.device.store, paramcast.common.package, " \
              "paramcast.device.policy, paramcast.device.ideal, paramcast.device.policy_spec"
    proc = run_without_torch(tmp_path, ["-c", f"import json, sys, {modules}; print(json.dumps({LOADED}))"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a_throttled_download_waits_as_told_and_a_broken_one_backs_off_within_its_deadline():
    throttled = cloud_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes/s", [("retry-after-ms", "250")]))
    assert isinstance(throttled, DeviceRateLimited) and throttled.retry_after_s == 0.25
    far = time.monotonic() + 60
    assert next_attempt(throttled, failures=2, max_resumes=3, deadline=far) == (0.25, 2)  # not a failure
    broken = cloud_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    delay, failures = next_attempt(broken, failures=2, max_resumes=3, deadline=far)
    assert failures == 3 and 0 <= delay <= 0.8
    with pytest.raises(CloudUnavailable):
        next_attempt(broken, failures=3, max_resumes=3, deadline=far)  # out of resumes
    with pytest.raises(RateLimited):
        next_attempt(throttled, failures=0, max_resumes=3, deadline=time.monotonic() + 0.1)  # past the deadline
    refused = cloud_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))  # no hint: a real refusal
    with pytest.raises(RateLimited):
        next_attempt(refused, failures=0, max_resumes=3, deadline=far)


def test_a_package_larger_than_the_device_accepts_is_refused_before_a_byte_is_written(tmp_path):
    archive = pack_package(tiny_package())
    model_id, _ = package_id()
    first = next(chunks(archive, 8192))
    first.total_size = 5 * 2**40  # a hostile server advertising 5 TiB
    download = Download(tmp_path, model_id, "")
    with pytest.raises(PackageTooLarge, match="5497558138880-byte package"):
        download.accept(first)
    assert not download.part.exists() and not download.meta_file.exists()
    small = Download(tmp_path, model_id, "", max_bytes=len(archive) - 1)  # the device's own, lower limit
    with pytest.raises(PackageTooLarge, match=f"at most {len(archive) - 1} bytes"):
        small.accept(next(chunks(archive, 8192)))


def archive_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_unpacking_writes_no_file_beyond_what_the_manifest_declares(tmp_path):
    pkg = tiny_package()
    manifest = (pkg / "manifest.json").read_bytes()
    model = (pkg / "model.onnx").read_bytes()
    cases = {
        "larger than declared": ([("manifest.json", manifest), ("model.onnx", model + b"\0" * 2**20)],
                                 "holds .* bytes; the manifest declares"),
        "not listed": ([("manifest.json", manifest), ("extra.bin", b"x" * 100)], "not listed in the manifest"),
        "manifest not first": ([("model.onnx", model), ("manifest.json", manifest)], "first member"),
    }
    for name, (members, message) in cases.items():
        (tmp_path / "a.tar").write_bytes(archive_of(members))
        with pytest.raises(IntegrityError, match=message):
            unpack_package(tmp_path / "a.tar", tmp_path / "out")
        assert not (tmp_path / "out").exists(), name
        assert [p.name for p in tmp_path.iterdir()] == ["a.tar"], name  # no temporary directory left
    (tmp_path / "a.tar").write_bytes(pack_package(pkg))
    with pytest.raises(IntegrityError, match="larger than the 1000 this device accepts"):
        unpack_package(tmp_path / "a.tar", tmp_path / "out", max_bytes=1000)


def test_a_complete_archive_that_fails_to_unpack_is_discarded_so_the_next_call_refetches(tmp_path):
    pkg = tiny_package()
    bad = archive_of([("manifest.json", (pkg / "manifest.json").read_bytes()), ("model.onnx", b"not a model")])
    model_id, _ = package_id()
    download = Download(tmp_path, model_id, "")
    for msg in chunks(bad, 4096):  # every chunk and the whole-archive sha256 verify: the server sent these bytes
        download.accept(msg)
    assert download.complete
    with pytest.raises(IntegrityError, match="model.onnx"):
        download.finish()
    assert not download.part.exists() and not download.meta_file.exists()
    assert Download(tmp_path, model_id, "").offset == 0  # the next attempt starts over


def test_odd_files_in_the_download_folders_are_recovered_from(tmp_path):
    model_id, version = package_id()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / f"{model_id}.part").mkdir()  # a directory where the partial file belongs
    os.mkfifo(downloads / f"{model_id}.part.json")  # a FIFO where its identity belongs: open() would block
    held = tmp_path / "packages" / f"{model_id}-{version}"
    held.parent.mkdir()
    held.write_bytes(b"a file where the unpacked package belongs")

    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("download", Download(tmp_path, model_id, "")),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "opening the download blocked"
    download = result["download"]
    assert download.offset == 0 and not download.part.exists() and not download.meta_file.exists()
    for msg in chunks(pack_package(tiny_package()), 65536):
        assert download.accept(msg) is False  # the file at the package's place is no held copy
    package = download.finish()
    assert package.path == held and package.model_bytes == (tiny_package() / "model.onnx").read_bytes()

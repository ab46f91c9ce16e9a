"""The device's side of paramcast.v1: Generate a bundle, download the package. Sync and asyncio.

    with ParamClient("cloud:50051", device_id="device-17", token="s3cret") as client:
        package = client.download_package("sasrec-ml-100k", "state/")   # resumable, verified, unpacked
        fetched = client.generate([5, 9, 12], package.model_id, package.base_version)
        runtime.apply(fetched.bundle)                                    # checksum and base already checked

    async with AsyncParamClient("cloud:50051") as client:               # grpc.aio: many devices, one loop
        fetched = await client.generate(window, model_id, base_version, device_id="d1", token="...")

One client holds one channel for its whole life (connections, TLS sessions and HTTP/2 streams
are reused), and any number of devices may share it: `device_id` and `token` can be given per
call. Each call has a deadline. Transient failures (UNAVAILABLE: the server restarting, a
connection reset) are retried by gRPC itself with exponential backoff and jitter, configured in
the channel's service config (`service_config()`), so every gRPC stack that reads the same JSON
behaves alike. A download that breaks mid-stream resumes from the bytes already verified and
written, with its own backoff. Errors reach the caller as ParamCast's typed errors (`common.errors`)
plus `CloudUnavailable` for "try again later"; the gRPC status code is on `.code`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from paramcast.common.bundle import ENCODINGS, DeltaBundle
from paramcast.common.errors import (
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    ParamCastError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    VersionMismatch,
)
from paramcast.common.package import DevicePackage, unpack_package
from paramcast.common.serde import SERVICE_NAME, bundle_from_proto, check_bundle_for, encoding_to_proto
from paramcast.device.store import write_atomic
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

log = logging.getLogger("paramcast.device")

Progress = Callable[[int, int], None]  # (bytes held, total bytes)


class CloudUnavailable(ParamCastError):
    """The cloud could not be reached or did not answer in time; try again later."""


class RemoteError(ParamCastError):
    """The server answered with a status ParamCast does not map to a more specific error."""


_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_ERRORS: dict[grpc.StatusCode, Callable[[str], ParamCastError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: lambda m: InvalidInput("request", m),
    grpc.StatusCode.OUT_OF_RANGE: lambda m: InvalidInput("offset", m),
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: VersionMismatch,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
}


def cloud_error(exc: grpc.RpcError) -> ParamCastError:
    """The typed error for a failed call; `.code` keeps the gRPC status code."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or code.name
    if code in _TRANSIENT:
        err: ParamCastError = CloudUnavailable(f"{code.name}: {details}")
    else:
        err = _ERRORS.get(code, lambda m: RemoteError(f"{code.name}: {m}"))(details)
    err.code = code  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------------------------
# Channel configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC transparent retries for UNAVAILABLE: attempt n waits random(0, min(initial * mult^(n-1), max))."""

    max_attempts: int = 5  # including the first; gRPC caps this at 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0


def service_config(retry: RetryPolicy = RetryPolicy()) -> str:
    """The channel's service config JSON: retries with exponential backoff and jitter, UNAVAILABLE only
    (the one status where the server certainly did no work; every other status is a real answer)."""
    policy = {
        "maxAttempts": max(2, min(5, retry.max_attempts)),
        "initialBackoff": f"{retry.initial_backoff_s:.3f}s",
        "maxBackoff": f"{retry.max_backoff_s:.3f}s",
        "backoffMultiplier": retry.multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]})


def channel_options(retry: RetryPolicy = RetryPolicy(), reconnect_backoff_s: tuple[float, float] = (0.2, 10.0),
                    max_response_bytes: int = 8 * 1024 * 1024) -> list[tuple[str, object]]:
    initial, maximum = reconnect_backoff_s
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(retry)),
        # How soon a broken connection is retried in the background: a device should notice a
        # returning server within seconds, not gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", int(initial * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(initial * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(maximum * 1000)),
        ("grpc.max_receive_message_length", max_response_bytes),
    ]


def _credentials(tls: bool, root_certificates: bytes | None):
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


# ---------------------------------------------------------------------------------------------
# Generate: request and response handling shared by both clients
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """A verified bundle and the DeltaBundle message bytes as received (what BundleStore keeps)."""

    bundle: DeltaBundle
    data: bytes
    response_bytes: int  # serialized GenerateResponse size (the payload on the wire, before gRPC framing)
    seconds: float


def _generate_request(window, model_id: str, base_version: str, device_id: str | None, encoding: str,
                      keep_ratio: float) -> pb.GenerateRequest:
    if not device_id:
        raise InvalidInput("device_id", "is required (give it to the client or to the call)")
    if encoding not in ENCODINGS:
        raise InvalidInput("encoding", f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    return pb.GenerateRequest(
        model_id=model_id, base_version=base_version, device_id=device_id,
        window=[int(i) for i in window], encoding=encoding_to_proto(encoding), keep_ratio=float(keep_ratio),
    )


def _fetched(response: pb.GenerateResponse, model_id: str, base_version: str, started: float) -> Fetched:
    """Verify a response before anyone can apply it: checksum (IntegrityError), then that it is
    for the model and base version asked for (VersionMismatch)."""
    bundle = bundle_from_proto(response.bundle)
    check_bundle_for(bundle, model_id, base_version)
    return Fetched(bundle, response.bundle.SerializeToString(), response.ByteSize(), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# GetModel: a resumable download, shared by both clients
# ---------------------------------------------------------------------------------------------

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PACKAGES_DIR = "packages"
DOWNLOADS_DIR = "downloads"


def package_dir(root: str | Path, model_id: str, version: str) -> Path:
    """Where a device keeps an unpacked package: ROOT/packages/MODEL_ID-VERSION."""
    for name, value in (("model_id", model_id), ("version", version)):
        if not _SAFE.match(value):
            raise IntegrityError(f"{name} {value[:80]!r} cannot name a directory")
    return Path(root) / PACKAGES_DIR / f"{model_id}-{version}"


class _Download:
    """Bytes of one package archive arriving in order, written to ROOT/downloads/MODEL_ID.part.

    Only verified chunks are written (each chunk's sha256, then contiguity and a consistent
    total size and archive hash), and the archive's identity (version, size, sha256) is kept
    beside the partial file, so a later call resumes where this one stopped, even in another
    process, and never splices two different archives together.
    """

    def __init__(self, root: str | Path, model_id: str, version: str):
        if not _SAFE.match(model_id):
            raise InvalidInput("model_id", f"{model_id[:80]!r} cannot name a file")
        self.root, self.model_id, self.requested = Path(root), model_id, version
        folder = self.root / DOWNLOADS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.part = folder / f"{model_id}.part"
        self.meta_file = folder / f"{model_id}.part.json"
        self.meta: dict | None = None
        self.offset = 0
        self.held: DevicePackage | None = None  # set when the server's version is already unpacked here
        self._resume()

    def _resume(self) -> None:
        try:
            meta = json.loads(self.meta_file.read_text())
            size = self.part.stat().st_size
        except (OSError, ValueError):
            self.reset()
            return
        if (not isinstance(meta, dict) or (self.requested and meta.get("version") != self.requested)
                or not isinstance(meta.get("total_size"), int) or size > meta["total_size"]):
            self.reset()
            return
        self.meta, self.offset = meta, size
        log.info("resuming the download of %s %s at byte %d of %d", self.model_id, meta["version"], size,
                 meta["total_size"])

    def reset(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_file.unlink(missing_ok=True)
        self.meta, self.offset = None, 0

    def request(self, chunk_size: int) -> pb.GetModelRequest:
        version = self.meta["version"] if self.meta else self.requested
        return pb.GetModelRequest(model_id=self.model_id, version=version, offset=self.offset, chunk_size=chunk_size)

    @property
    def complete(self) -> bool:
        return self.meta is not None and self.offset == self.meta["total_size"]

    def accept(self, msg: pb.GetModelResponse) -> bool:
        """Verify and write one chunk; True when the rest is not needed (this version is already held)."""
        if msg.model_id != self.model_id:
            raise IntegrityError(f"GetModel answered for model {msg.model_id!r}, not {self.model_id!r}")
        if len(msg.chunk_sha256) != 32 or hashlib.sha256(msg.data).digest() != msg.chunk_sha256:
            raise IntegrityError(f"chunk at offset {msg.offset}: sha256 does not match its data")
        identity = {"version": msg.version, "total_size": msg.total_size, "archive_sha256": msg.archive_sha256.hex()}
        if self.meta is None:
            if not msg.version or msg.total_size < 0 or len(msg.archive_sha256) != 32:
                raise IntegrityError("GetModel response without a version, size or archive sha256")
            if self.requested and msg.version != self.requested:
                raise IntegrityError(f"asked for version {self.requested!r}, got {msg.version!r}")
            self.held = self._held(msg.version)
            if self.held is not None:
                return True
            self.meta = identity
            write_atomic(self.meta_file, json.dumps(identity).encode())
        elif identity != self.meta:
            raise IntegrityError("the archive changed during the download (version, size or sha256 differ)")
        if msg.offset != self.offset:
            raise IntegrityError(f"chunk at offset {msg.offset}, expected {self.offset}")
        if self.offset + len(msg.data) > msg.total_size:
            raise IntegrityError(f"chunk at offset {msg.offset} runs past the archive's {msg.total_size} bytes")
        with open(self.part, "ab") as f:
            f.write(msg.data)
        self.offset += len(msg.data)
        return False

    def _held(self, version: str) -> DevicePackage | None:
        """The package of `version` if it is already unpacked here and still verifies."""
        dest = package_dir(self.root, self.model_id, version)
        if not dest.exists():
            return None
        try:
            return DevicePackage.load(dest)
        except (IntegrityError, ModelNotFound) as exc:
            log.warning("the held copy of %s %s is damaged (%s); downloading it again", self.model_id, version, exc)
            shutil.rmtree(dest, ignore_errors=True)
            return None

    def finish(self) -> DevicePackage:
        """Check the whole archive's sha256, unpack it atomically, verify it; -> the package."""
        assert self.meta is not None and self.complete
        digest = hashlib.sha256()
        with open(self.part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        if digest.hexdigest() != self.meta["archive_sha256"]:
            self.reset()
            raise IntegrityError("downloaded package: archive sha256 does not match; the download starts over")
        version = self.meta["version"]
        dest = package_dir(self.root, self.model_id, version)
        if dest.exists():  # already unpacked by an earlier download of the same version
            package = DevicePackage.load(dest)
        else:
            package = unpack_package(self.part, dest)
        self.reset()
        if (package.model_id, package.base_version) != (self.model_id, version):
            shutil.rmtree(dest, ignore_errors=True)
            raise IntegrityError(f"the package served as {self.model_id} {version} is "
                                 f"{package.model_id} {package.base_version}")
        return package


def _backoff(attempt: int, initial: float = 0.2, maximum: float = 5.0) -> float:
    """Full jitter: random(0, min(initial * 2^attempt, maximum))."""
    return random.uniform(0, min(initial * 2**attempt, maximum))


def _can_resume(err: BaseException) -> bool:
    """A broken stream or a bad chunk: resume from what was verified and written so far."""
    return isinstance(err, (CloudUnavailable, IntegrityError))


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


class _Base:
    def __init__(self, target: str, *, device_id: str | None = None, token: str | None = None,
                 timeout_s: float = 5.0, download_timeout_s: float = 300.0, retry: RetryPolicy = RetryPolicy(),
                 reconnect_backoff_s: tuple[float, float] = (0.2, 10.0), gzip: bool = False, tls: bool = False,
                 root_certificates: bytes | None = None, max_resumes: int = 5):
        self.target, self.device_id, self.token = target, device_id, token
        self.timeout_s, self.download_timeout_s, self.max_resumes = timeout_s, download_timeout_s, max_resumes
        self._options = channel_options(retry, reconnect_backoff_s)
        self._credentials = _credentials(tls, root_certificates)
        self._compression = grpc.Compression.Gzip if gzip else None


class ParamClient(_Base):
    """Blocking client over one grpc channel (thread-safe: gRPC channels are)."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(target, self._options, self._compression)
        else:
            self.channel = grpc.secure_channel(target, self._credentials, self._options, self._compression)
        self.stub = pb_grpc.ParamServiceStub(self.channel)

    def generate(self, window: Sequence[int], model_id: str, base_version: str, *, encoding: str = "int8",
                 keep_ratio: float = 0.0, device_id: str | None = None, token: str | None = None,
                 timeout_s: float | None = None) -> Fetched:
        """A verified bundle for (model_id, base_version) from this behaviour window."""
        request = _generate_request(window, model_id, base_version, device_id or self.device_id, encoding,
                                    keep_ratio)
        started = time.perf_counter()
        try:
            response = self.stub.Generate(request, timeout=timeout_s or self.timeout_s,
                                          metadata=_metadata(token or self.token))
        except grpc.RpcError as exc:
            raise cloud_error(exc) from None
        return _fetched(response, model_id, base_version, started)

    def download_package(self, model_id: str, root: str | Path, version: str = "", chunk_size: int = 0,
                         token: str | None = None, progress: Progress | None = None) -> DevicePackage:
        """Fetch (or resume fetching) the package into ROOT/packages/, verify and unpack it."""
        download = _Download(root, model_id, version)
        failures = 0
        while True:
            try:
                stream = self.stub.GetModel(download.request(chunk_size), timeout=self.download_timeout_s,
                                            metadata=_metadata(token or self.token))
                for msg in stream:
                    if download.accept(msg):
                        stream.cancel()
                        return download.held  # type: ignore[return-value]
                    if progress is not None:
                        progress(download.offset, download.meta["total_size"])  # type: ignore[index]
                if download.complete:
                    return download.finish()
                raise CloudUnavailable("the package stream ended before the last byte")
            except grpc.RpcError as exc:
                err = _download_error(exc, download)
            except (CloudUnavailable, IntegrityError) as exc:
                err = exc
            failures += 1
            if not _can_resume(err) or failures > self.max_resumes:
                raise err
            log.warning("download of %s interrupted at byte %d (%s); resuming", model_id, download.offset, err)
            time.sleep(_backoff(failures - 1))

    def check_health(self, timeout_s: float = 2.0) -> bool:
        """True when the server reports ParamService as SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncParamClient(_Base):
    """The same client on grpc.aio: create it inside the event loop that will use it."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(target, self._options, self._compression)
        else:
            self.channel = grpc.aio.secure_channel(target, self._credentials, self._options, self._compression)
        self.stub = pb_grpc.ParamServiceStub(self.channel)

    async def generate(self, window: Sequence[int], model_id: str, base_version: str, *, encoding: str = "int8",
                       keep_ratio: float = 0.0, device_id: str | None = None, token: str | None = None,
                       timeout_s: float | None = None) -> Fetched:
        request = _generate_request(window, model_id, base_version, device_id or self.device_id, encoding,
                                    keep_ratio)
        started = time.perf_counter()
        try:
            response = await self.stub.Generate(request, timeout=timeout_s or self.timeout_s,
                                                metadata=_metadata(token or self.token))
        except grpc.RpcError as exc:
            raise cloud_error(exc) from None
        return _fetched(response, model_id, base_version, started)

    async def download_package(self, model_id: str, root: str | Path, version: str = "", chunk_size: int = 0,
                               token: str | None = None, progress: Progress | None = None) -> DevicePackage:
        download = _Download(root, model_id, version)
        failures = 0
        while True:
            try:
                stream = self.stub.GetModel(download.request(chunk_size), timeout=self.download_timeout_s,
                                            metadata=_metadata(token or self.token))
                async for msg in stream:
                    if download.accept(msg):
                        stream.cancel()
                        return download.held  # type: ignore[return-value]
                    if progress is not None:
                        progress(download.offset, download.meta["total_size"])  # type: ignore[index]
                if download.complete:
                    return download.finish()
                raise CloudUnavailable("the package stream ended before the last byte")
            except grpc.RpcError as exc:
                err = _download_error(exc, download)
            except (CloudUnavailable, IntegrityError) as exc:
                err = exc
            failures += 1
            if not _can_resume(err) or failures > self.max_resumes:
                raise err
            log.warning("download of %s interrupted at byte %d (%s); resuming", model_id, download.offset, err)
            await asyncio.sleep(_backoff(failures - 1))

    async def check_health(self, timeout_s: float = 2.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncParamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _download_error(exc: grpc.RpcError, download: _Download) -> ParamCastError:
    """A resumed download whose version is gone, or whose offset no longer fits, starts over."""
    err = cloud_error(exc)
    resumed = download.meta is not None and not download.requested
    if resumed and exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
        log.warning("the partial download of %s is no longer served (%s); starting over", download.model_id, err)
        download.reset()
        return CloudUnavailable(str(err))  # resumable: the next attempt starts from byte 0
    return err

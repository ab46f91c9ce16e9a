"""The device's side of paramcast.v1: Generate a bundle, download the package. asyncio, and blocking.

    with ParamClient("cloud:50051", device_id="device-17", token="s3cret") as client:
        package = client.download_package("sasrec-ml-100k", "state/")   # resumable, verified, unpacked
        fetched = client.generate([5, 9, 12], package.model_id, package.base_version)
        runtime.apply(fetched.bundle)                                    # checksum and base already checked

    async with AsyncParamClient("cloud:50051") as client:               # grpc.aio: many devices, one loop
        fetched = await client.generate(window, model_id, base_version, device_id="d1", token="...")

`AsyncParamClient` is the client; `ParamClient` is the same client for blocking callers, run on an
event loop of its own in a background thread. One client holds one channel for its whole life
(connections, TLS sessions and HTTP/2 streams are reused), and any number of devices may share it:
`device_id` and `token` can be given per call; `application` names the Ray Serve application to
reach when the server is a Ray cluster running several (cloud/service/ray_proxy.py). Each call
has a deadline. Transient failures (UNAVAILABLE: the server restarting, a connection reset) are
retried by gRPC itself with exponential backoff and jitter, configured in the channel's service
config (`service_config()`), so every gRPC stack that reads the same JSON behaves alike. A
download that breaks mid-stream resumes from the bytes already verified and written, with its
own backoff; one the server
throttles (RESOURCE_EXHAUSTED with `retry-after-ms`: the device's download byte rate) waits as long
as the server says and resumes, all within `download_timeout_s`; a package above
`max_package_bytes` is refused before a byte is written (device/download.py). Errors reach the
caller as ParamCast's typed errors (`common.errors`, through the status table in
`common/status.py`), `CloudUnavailable` meaning "try again later"; the gRPC status code is on
`.code`. A device the server rate-limited gets `DeviceRateLimited` with the server's
`retry-after-ms` hint as `retry_after_s`, and until that time has passed the client refuses the
device's Generate calls itself, without sending them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from paramcast.common.bundle import DeltaBundle, check_bundle_for
from paramcast.common.errors import (
    CloudUnavailable,
    DeviceRateLimited,
    IntegrityError,
    InvalidInput,
    ParamCastError,
)
from paramcast.common.loop import LoopThread
from paramcast.common.package import MAX_ARCHIVE_BYTES, DevicePackage
from paramcast.common.serde import SERVICE_NAME, bundle_from_proto, encoding_to_proto
from paramcast.common.status import error_from_status
from paramcast.device.download import Download, Progress, next_attempt, remaining
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

log = logging.getLogger("paramcast.device")

T = TypeVar("T")


def cloud_error(exc: grpc.RpcError) -> ParamCastError:
    """The typed error for a failed call (`common/status.py`'s table); `.code` keeps the status
    code, and a rate-limited device's error carries the server's `retry-after-ms` as `retry_after_s`."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else None
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return error_from_status(code, details, trailers or ())


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


def _credentials(tls: bool, root_certificates: bytes | None, client_certificate: bytes | None = None,
                 client_key: bytes | None = None):
    """TLS channel credentials (None = plaintext); a client certificate and key make it mutual TLS."""
    if (client_certificate is None) != (client_key is None):
        raise InvalidInput("client_certificate", "give the client certificate and its key together")
    if not tls and root_certificates is None and client_certificate is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=client_key,
                                        certificate_chain=client_certificate)


def _metadata(token: str | None, application: str | None = None) -> tuple[tuple[str, str], ...] | None:
    entries = [("authorization", f"Bearer {token}")] if token else []
    if application:  # Ray Serve's proxy: which of the cluster's applications the call is for
        entries.append(("application", application))
    return tuple(entries) or None


# ---------------------------------------------------------------------------------------------
# Generate: the request and the verified response
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
    """A window of strings is sent as catalogue ids (`catalogue_window`), one of ints as model ids."""
    if not device_id:
        raise InvalidInput("device_id", "is required (give it to the client or to the call)")
    items = list(window)
    catalogue = bool(items) and all(isinstance(i, str) for i in items)
    return pb.GenerateRequest(
        model_id=model_id, base_version=base_version, device_id=device_id,
        window=[] if catalogue else [int(i) for i in items], catalogue_window=items if catalogue else [],
        encoding=encoding_to_proto(encoding), keep_ratio=float(keep_ratio),
    )


@dataclass(frozen=True)
class ModelInfo:
    """A served model id (ListModels): the base versions Generate accepts, oldest first, and the latest."""

    model_id: str
    base_versions: tuple[str, ...]
    latest_version: str


def _fetched(response: pb.GenerateResponse, request: pb.GenerateRequest, started: float) -> Fetched:
    """Verify a response before anyone can apply it: checksum (IntegrityError), then that it is
    for the model and base version asked for (VersionMismatch) and for the device that asked
    (DeviceMismatch)."""
    bundle = bundle_from_proto(response.bundle)
    check_bundle_for(bundle, request.model_id, request.base_version, request.device_id)
    return Fetched(bundle, response.bundle.SerializeToString(), response.ByteSize(), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class AsyncParamClient:
    """The device's client on grpc.aio: create it inside the event loop that will use it."""

    def __init__(self, target: str, *, device_id: str | None = None, token: str | None = None,
                 timeout_s: float = 5.0, download_timeout_s: float = 300.0, retry: RetryPolicy = RetryPolicy(),
                 reconnect_backoff_s: tuple[float, float] = (0.2, 10.0), gzip: bool = False, tls: bool = False,
                 root_certificates: bytes | None = None, client_certificate: bytes | None = None,
                 client_key: bytes | None = None, max_resumes: int = 5, max_package_bytes: int = MAX_ARCHIVE_BYTES,
                 application: str | None = None):
        self.target, self.device_id, self.token, self.application = target, device_id, token, application
        # download_timeout_s bounds a whole download: every resume and every throttled wait.
        self.timeout_s, self.download_timeout_s, self.max_resumes = timeout_s, download_timeout_s, max_resumes
        self.max_package_bytes = max_package_bytes
        options = channel_options(retry, reconnect_backoff_s)
        credentials = _credentials(tls, root_certificates, client_certificate, client_key)
        compression = grpc.Compression.Gzip if gzip else None
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options, compression)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options, compression)
        self.stub = pb_grpc.ParamServiceStub(self.channel)
        self._not_before: dict[str, float] = {}  # device id -> time.monotonic() the server said to wait for

    async def generate(self, window: Sequence[int], model_id: str, base_version: str, *, encoding: str = "int8",
                       keep_ratio: float = 0.0, device_id: str | None = None, token: str | None = None,
                       timeout_s: float | None = None) -> Fetched:
        """A verified bundle for (model_id, base_version) from this behaviour window."""
        request = _generate_request(window, model_id, base_version, device_id or self.device_id, encoding,
                                    keep_ratio)
        self._admit(request.device_id)
        started = time.perf_counter()
        try:
            response = await self.stub.Generate(request, timeout=timeout_s or self.timeout_s,
                                                metadata=_metadata(token or self.token, self.application))
        except grpc.RpcError as exc:
            raise self._refused(request.device_id, exc) from None
        return _fetched(response, request, started)

    async def list_models(self, token: str | None = None, timeout_s: float | None = None) -> list[ModelInfo]:
        """The model ids the server serves, with their base versions."""
        try:
            response = await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s or self.timeout_s,
                                                  metadata=_metadata(token or self.token))
        except grpc.RpcError as exc:
            raise cloud_error(exc) from None
        return [ModelInfo(m.model_id, tuple(m.base_versions), m.latest_version) for m in response.models]

    def _admit(self, device_id: str) -> None:
        """Refuse a call locally while the server's retry-after hint for this device still runs."""
        wait = self._not_before.get(device_id, 0.0) - time.monotonic()
        if wait > 0:
            raise DeviceRateLimited(f"device {device_id!r} was rate-limited; the server asked it to wait "
                                    f"{wait * 1000:.0f} ms more", retry_after_s=wait)
        self._not_before.pop(device_id, None)

    def _refused(self, device_id: str, exc: grpc.RpcError) -> ParamCastError:
        err = cloud_error(exc)
        if isinstance(err, DeviceRateLimited):
            self._not_before[device_id] = time.monotonic() + err.retry_after_s
        return err

    async def download_package(self, model_id: str, root: str | Path, version: str = "", chunk_size: int = 0,
                               token: str | None = None, progress: Progress | None = None) -> DevicePackage:
        """Fetch (or resume fetching) the package into ROOT/packages/, verify and unpack it."""
        download = Download(root, model_id, version, self.max_package_bytes)
        failures, deadline = 0, time.monotonic() + self.download_timeout_s
        while True:
            try:
                request = pb.GetModelRequest(model_id=model_id, version=download.version, offset=download.offset,
                                             chunk_size=chunk_size)
                stream = self.stub.GetModel(request, timeout=remaining(deadline),
                                            metadata=_metadata(token or self.token, self.application))
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
            delay, failures = next_attempt(err, failures, self.max_resumes, deadline)
            log.log(logging.INFO if isinstance(err, DeviceRateLimited) else logging.WARNING,
                    "download of %s interrupted at byte %d (%s); resuming in %.2f s", model_id, download.offset,
                    err, delay)
            await asyncio.sleep(delay)

    async def check_health(self, timeout_s: float = 2.0) -> bool:
        """True when the server reports ParamService as SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # grpcio-health-checking: not in the device extra

        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s,
                metadata=_metadata(None, self.application))
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncParamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class ParamClient:
    """The same client for blocking callers: an AsyncParamClient (`.aio`) on an event loop of its
    own in a background thread. Thread-safe: calls from any number of threads share the channel."""

    def __init__(self, target: str, **kwargs):
        self._loop = LoopThread("paramcast-client")

        async def make() -> AsyncParamClient:
            return AsyncParamClient(target, **kwargs)

        self.aio = self._loop.run(make())

    def call(self, fn: Callable[[AsyncParamClient], Awaitable[T]]) -> T:
        """Run `fn(self.aio)` on the client's loop and wait for it (how the agent's blocking methods
        share one implementation with their asynchronous twins)."""
        async def run() -> T:
            return await fn(self.aio)

        return self._loop.run(run())

    def generate(self, *args, **kwargs) -> Fetched:
        """`AsyncParamClient.generate`, blocking."""
        return self.call(lambda c: c.generate(*args, **kwargs))

    def list_models(self, *args, **kwargs) -> list[ModelInfo]:
        """`AsyncParamClient.list_models`, blocking."""
        return self.call(lambda c: c.list_models(*args, **kwargs))

    def download_package(self, *args, **kwargs) -> DevicePackage:
        """`AsyncParamClient.download_package`, blocking (`progress` runs on the client's thread)."""
        return self.call(lambda c: c.download_package(*args, **kwargs))

    def check_health(self, timeout_s: float = 2.0) -> bool:
        return self.call(lambda c: c.check_health(timeout_s))

    def close(self) -> None:
        self.call(AsyncParamClient.close)
        self._loop.stop()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _download_error(exc: grpc.RpcError, download: Download) -> ParamCastError:
    """A resumed download whose version is gone, or whose offset no longer fits, starts over."""
    err = cloud_error(exc)
    resumed = download.meta is not None and not download.requested
    if resumed and exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
        log.warning("the partial download of %s is no longer served (%s); starting over", download.model_id, err)
        download.reset()
        return CloudUnavailable(str(err))  # resumable: the next attempt starts from byte 0
    return err

"""The ParamCast gRPC server: one factory that builds, binds and starts it.

    server, port = await start_server(["runs/ml-100k"], "127.0.0.1", 0)   # port 0: the OS picks
    ...
    await server.stop(grace=10)                                            # drains in-flight calls

What a started server has: ParamService behind the error interceptor, the standard health service
(`grpc.health.v1.Health`, SERVING for "" and "paramcast.v1.ParamService" until shutdown begins)
and server reflection (unless `reflection_enabled=False`); optional TLS, optionally mutual (client
certificates signed by `TlsConfig.client_ca`); optional gzip for responses; a bound on request
message size (larger requests get RESOURCE_EXHAUSTED from gRPC itself, before any ParamCast code
runs); Prometheus metrics in a registry of its own, exposed over HTTP when `metrics_port` is given
(cloud/service/metrics_http.py: loopback by default, optional token, HTTPS when TLS is on).

What is exposed without credentials: device tokens gate ParamService only. Health and reflection
answer anyone who reaches the gRPC port (health tells only whether the server is serving;
reflection describes the public contract, and can be turned off); the metrics port has its own
token. A server refuses to start tokenless, or with a tokenless metrics port, on a non-loopback
address unless `insecure=True` says that is meant, and warns when it serves plaintext beyond
loopback.

Shutdown is graceful: health turns NOT_SERVING (load balancers stop sending), the server stops
accepting calls, in-flight calls finish within `grace` seconds (their queued requests still get
their generator pass), and only then the batcher and its thread stop.

`ServerThread` runs a server on its own event loop in a background thread, for synchronous
callers (tests, notebooks).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramcast.cloud.checkpoint import Checkpoint, load_checkpoint
from paramcast.cloud.service.auth import RateLimiter, TokenAuth
from paramcast.cloud.service.core import Limits, ServiceCore
from paramcast.cloud.service.interceptor import ErrorInterceptor
from paramcast.cloud.service.metrics import ServiceMetrics
from paramcast.cloud.service.metrics_http import MetricsEndpoint, server_ssl_context
from paramcast.cloud.service.registry import ModelRegistry
from paramcast.cloud.service.servicer import ParamServicer
from paramcast.common.errors import IntegrityError, InvalidInput, ModelNotFound
from paramcast.common.loop import LoopThread
from paramcast.common.package import MANIFEST_FILE, DevicePackage
from paramcast.common.serde import SERVICE_NAME
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

log = logging.getLogger("paramcast.service")

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024  # a 1024-item window is at most ~10 KiB; anything far larger is abuse
PACKAGE_SUBDIR = "package"  # `paramcast export --out MODEL_DIR/package` is picked up by serve


@dataclass(frozen=True)
class TlsConfig:
    certificate_chain: bytes  # PEM
    private_key: bytes  # PEM
    client_ca: bytes | None = None  # PEM; set = mutual TLS: clients need a certificate this CA signed

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> TlsConfig:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(),
                   None if client_ca is None else Path(client_ca).read_bytes())


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0 / ::, every interface): reachable from elsewhere


def check_exposure(host: str, auth: TokenAuth, tls: TlsConfig | None, metrics_host: str | None,
                   metrics_token: str | None, insecure: bool) -> None:
    """Refuse listeners anyone on the network could use without credentials (unless `insecure`),
    and warn about plaintext beyond loopback."""
    if not is_loopback(host) and not auth.enabled and not insecure:
        raise InvalidInput("host", f"{host} is reachable from other machines and no --tokens were given, so any "
                                   "caller could generate bundles and download the package; give --tokens, bind "
                                   "loopback, or pass --insecure to serve it anyway")
    if metrics_host is not None and not is_loopback(metrics_host) and metrics_token is None and not insecure:
        raise InvalidInput("metrics_host", f"{metrics_host} is reachable from other machines and no metrics token "
                                           "was given; give --metrics-token, bind loopback, or pass --insecure")
    for name, bound in (("gRPC", host), ("metrics", metrics_host)):
        if bound is not None and not is_loopback(bound) and tls is None:
            log.warning("the %s port on %s is plaintext: tokens, bundles and metrics cross the network "
                        "unencrypted; use --tls-cert/--tls-key", name, bound)


def resolve_device(name: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is an error, not a silent CPU run."""
    if name not in ("auto", "cpu", "cuda"):
        raise InvalidInput("device", f"must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", "cuda was asked for but torch sees no CUDA device")
    return name


def load_models(models: Sequence[Checkpoint | str | Path], torch_device: str = "cpu") -> ModelRegistry:
    """A registry of checkpoints (objects or `paramcast train` directories), in order: for each
    model id, the last one given is the latest. A directory's `package/` subfolder is used as its
    device package when it matches the weights; otherwise the package is exported at start."""
    registry = ModelRegistry(torch_device)
    for item in models:
        if isinstance(item, Checkpoint):
            registry.add(item)
            continue
        path = Path(item)
        ckpt = load_checkpoint(path)
        registry.add(ckpt, _matching_package(path / PACKAGE_SUBDIR, ckpt))
    return registry


def _matching_package(path: Path, ckpt: Checkpoint) -> Path | None:
    if not (path / MANIFEST_FILE).exists():
        return None
    try:
        package = DevicePackage.load(path)
    except (IntegrityError, ModelNotFound) as exc:
        log.warning("ignoring %s: %s; exporting a fresh package", path, exc)
        return None
    if (package.model_id, package.base_version) != (ckpt.model_id, ckpt.base_version):
        log.warning("ignoring %s: it is the package of %s %s, not %s %s; exporting a fresh package", path,
                    package.model_id, package.base_version, ckpt.model_id, ckpt.base_version)
        return None
    return path


class ParamServer:
    """A started server: `port`, `metrics_port` (or None), `core`, `metrics`; `stop()` drains it."""

    def __init__(self, server: grpc.aio.Server, port: int, core: ServiceCore, metrics: ServiceMetrics,
                 health_servicer: health.aio.HealthServicer, metrics_http: MetricsEndpoint | None = None):
        self.server, self.port, self.core, self.metrics = server, port, core, metrics
        self.health = health_servicer
        self._metrics_http = metrics_http
        self.metrics_port: int | None = metrics_http.port if metrics_http else None
        self._stopped = False

    async def stop(self, grace: float | None = 10.0) -> None:
        """Graceful: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.core.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        log.info("server on port %d stopped", self.port)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    models: ModelRegistry | Sequence[Checkpoint | str | Path],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: Limits | None = None,
    auth: TokenAuth | None = None,
    rates: RateLimiter | None = None,
    tls: TlsConfig | None = None,
    metrics_port: int | None = None,
    gzip: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    torch_device: str = "cpu",
    download_rates: RateLimiter | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_token: str | None = None,
    reflection_enabled: bool = True,
    insecure: bool = False,
) -> tuple[ParamServer, int]:
    """Build, bind and start a server on the running event loop -> (server, bound port).

    `download_rates` limits GetModel bytes per caller; the metrics endpoint (when `metrics_port`
    is given) binds `metrics_host` and, with `metrics_token`, asks every scrape for it; `insecure`
    allows tokenless listeners on non-loopback addresses (see `check_exposure`)."""
    auth = TokenAuth(None) if auth is None else auth
    check_exposure(host, auth, tls, metrics_host if metrics_port is not None else None, metrics_token, insecure)
    registry = models if isinstance(models, ModelRegistry) else load_models(models, resolve_device(torch_device))
    metrics = ServiceMetrics()
    core = ServiceCore(registry, auth=auth, rates=rates, limits=limits, observer=metrics,
                       download_rates=download_rates)
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(SERVICE_NAME, metrics)],
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ("grpc.so_reuseport", 0),  # a second server must never silently share a port with the first
        ],
        compression=grpc.Compression.Gzip if gzip else None,
    )
    pb_grpc.add_ParamServiceServicer_to_server(ParamServicer(core, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["ParamService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls.private_key, tls.certificate_chain)], root_certificates=tls.client_ca,
                                            require_client_auth=tls.client_ca is not None)
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise InvalidInput("port", f"could not bind {address}")
    await server.start()
    core.batcher.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if metrics_port is not None:
        try:
            context = None if tls is None else server_ssl_context(tls.certificate_chain, tls.private_key,
                                                                  tls.client_ca)
            metrics_http = MetricsEndpoint(metrics.registry, metrics_host, metrics_port, token=metrics_token,
                                           tls=context)
        except BaseException:  # (a port in use, a bad certificate): never leave the gRPC server running
            await server.stop(None)
            await core.close()
            raise
    return ParamServer(server, bound, core, metrics, health_servicer, metrics_http), bound


class ServerThread:
    """A server on an event loop of its own in a daemon thread (`common.loop.LoopThread`), for
    synchronous callers; `port` is set once it is up."""

    def __init__(self, models, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self._args = (models, host, port)
        self._kwargs = kwargs
        self._loop: LoopThread | None = None
        self.server: ParamServer | None = None
        self.port = 0

    def start(self, timeout: float = 120.0) -> ServerThread:
        if self._loop is None:
            self._loop = LoopThread("paramcast-server")
            try:  # a start-up failure is raised here, in the caller's thread
                self.server, self.port = self._loop.run(start_server(*self._args, **self._kwargs), timeout)
            except BaseException:
                self._loop.stop()
                raise
        return self

    def run(self, coro, timeout: float | None = 60.0):
        """Run a coroutine on the server's loop from another thread and return its result."""
        assert self._loop is not None, "start() the server first"
        return self._loop.run(coro, timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        if self._loop is not None and self.server is not None:
            self.run(self.server.stop(grace), timeout=None if grace is None else grace + 30)
            self._loop.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""ParamService as a Ray Serve application: replicas behind Serve's gRPC proxy, micro-batched with
`@serve.batch`, optionally autoscaled, on GPUs where the cluster has them.

    from paramcast.cloud.service import ray_serve
    ray_serve.start(port=50051)                                   # Serve, with ParamService on its gRPC proxy
    ray_serve.deploy(ServiceConfig(models=("runs/ml-100k",)), Scaling(replicas=2))
    ...                                                           # devices call 127.0.0.1:50051 as usual
    ray_serve.undeploy()

`paramcast serve --engine ray` does the same from the command line; a KubeRay RayService names
`paramcast.cloud.service.ray_serve:app_builder` with the same settings as YAML (docs/scale-out.md).

Each replica holds the same ServiceCore as `paramcast serve` (same registry, credentials, checks
and error messages) and answers the same .proto with the same status codes. What differs is
around it:
- batching: concurrent Generate calls in a replica are gathered by `@serve.batch` (max batch
  size and wait as `--max-batch` / `--max-delay-ms`); a batch runs one generator pass per model
  version and keep ratio, in a worker thread, so the replica keeps accepting calls meanwhile;
- rate limits: one `RateLimits` deployment holds every device's token bucket, so a device gets
  its rate across all replicas, not once per replica; each replica sends the checks of its
  concurrent calls in one request to it. Losing that replica loses the buckets (devices start
  again with full ones) and answers UNAVAILABLE meanwhile;
- queue bound: `--max-queue` is Serve's `max_queued_requests` (RESOURCE_EXHAUSTED when full);
- shutdown: Serve drains a replica for up to `--grace` seconds before stopping it;
- the proxy: see cloud/service/ray_proxy.py (errors, deadlines, health, what it lacks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from paramcast.cloud.ray_cluster import free_port
from paramcast.cloud.service.auth import RateLimiter, TokenAuth, rate_key
from paramcast.cloud.service.core import Limits, ServiceCore
from paramcast.cloud.service.interceptor import answer_for
from paramcast.cloud.service.ray_proxy import deadline_from, refused
from paramcast.cloud.service.server import load_models
from paramcast.cloud.service.servicer import chunk_message, generate_call, metadata_of, models_message, peer_address
from paramcast.common.errors import DeadlineExpired, DeviceRateLimited, InvalidInput, Unavailable
from paramcast.common.serde import SERVICE_NAME, encoded_to_proto
from paramcast.v1 import param_service_pb2 as pb

log = logging.getLogger("paramcast.service")

APP_NAME = "paramcast"
ADD_SERVICE = "paramcast.cloud.service.ray_proxy.add_param_service"  # for gRPCOptions.grpc_servicer_functions


@dataclass(frozen=True)
class ServiceConfig:
    """What every replica serves and checks (the `paramcast serve` flags a replica needs)."""

    models: tuple[str, ...]  # checkpoint directories, as `--model`; the same path must exist on every node
    limits: Limits = field(default_factory=Limits)
    tokens_file: str | None = None  # as `--tokens`; read by each replica
    rate: float = 0.0  # Generate calls per second per device (0 = unlimited), across all replicas
    burst: float | None = None
    threads: int = 0  # torch intra-op threads per replica (0 = Ray's default: the replica's CPUs)


@dataclass(frozen=True)
class Scaling:
    """How many replicas, on what resources."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; overrides `replicas`
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0  # > 0: the replica generates on CUDA
    grace_s: float = 10.0  # how long Serve drains a stopping replica

    def check(self) -> None:
        if self.autoscale is None and self.replicas < 1:
            raise InvalidInput("replicas", f"must be >= 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise InvalidInput("autoscale", f"needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise InvalidInput("resources", "CPUs and GPUs per replica must be >= 0")


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` -> (min, max) replicas."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise InvalidInput("autoscale", f"expected MIN:MAX replicas such as 1:4, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# Replicas
# ---------------------------------------------------------------------------------------------


@dataclass
class _Queued:
    """One admitted Generate call waiting for its batch."""

    key: tuple[tuple[str, str], float | None]  # (model id, version), keep ratio: what one generator pass shares
    item: tuple[Any, str, str]  # (window, encoding, device id): what ServiceCore.compute takes
    deadline: float | None  # time.monotonic() on this replica


class _Answered(Exception):
    """Ends a streaming call whose status is already set on the call context."""


class ParamReplica:
    """One replica: ParamService's core on this replica's CPU or GPU, answering through Serve's
    copy of the call context (status, message and trailing metadata are set on it, as the
    ErrorInterceptor of the plain server sets them)."""

    def __init__(self, config: ServiceConfig, rate_limits: Any = None):
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        self.torch_device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        auth = TokenAuth.from_file(config.tokens_file) if config.tokens_file else TokenAuth(None)
        self.core = ServiceCore(load_models(list(config.models), self.torch_device), auth=auth, limits=config.limits)
        self.rates = _SharedRates(rate_limits) if rate_limits is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paramcast-generate")
        batch: Any = self._batch  # @serve.batch adds these setters to the method it wraps
        batch.set_max_batch_size(config.limits.max_batch)
        batch.set_batch_wait_timeout_s(config.limits.max_delay_ms / 1000)
        log.info("replica ready: %d model versions on %s", len(self.core.registry), self.torch_device)

    async def Generate(self, request: Any, grpc_context: Any) -> pb.GenerateResponse:
        try:
            error = refused(request)  # reaches here only when the proxy runs unguarded
            if error is not None:
                raise error
            metadata = metadata_of(grpc_context)
            deadline = deadline_from(metadata, time.monotonic())
            call = generate_call(request)
            principal, device_id = self.core.identify(call, metadata)
            if self.rates is not None:  # the key the plain server uses: the device, or the peer without tokens
                await self.rates.take(rate_key(principal, device_id, peer_address(grpc_context.peer())))
            served, window, keep_ratio = self.core.validate(call)
            outcome = await self._batch(_Queued((served.key, keep_ratio), (window, call.encoding, device_id),
                                                deadline))
            if isinstance(outcome, Exception):
                raise outcome
            return pb.GenerateResponse(bundle=encoded_to_proto(outcome))
        except Exception as exc:
            _answer(grpc_context, "Generate", exc)
            return pb.GenerateResponse()

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)  # set from the config in __init__
    async def _batch(self, queued: list[_Queued]) -> list[Any]:
        """One result per call: the encoded bundle, or the error that call gets. Calls whose
        deadline passed while they waited are dropped before any generation work."""
        now = time.monotonic()
        results: list[Any] = [None] * len(queued)
        groups: dict[Any, list[int]] = {}
        for i, q in enumerate(queued):
            if q.deadline is not None and now >= q.deadline:
                results[i] = DeadlineExpired("the deadline passed while the request waited for a batch")
            else:
                groups.setdefault(q.key, []).append(i)
        loop = asyncio.get_running_loop()
        for key, rows in groups.items():
            out: list[Any]
            try:
                out = await loop.run_in_executor(self._executor, self.core.compute, key, [queued[i].item for i in rows])
            except Exception as exc:  # the whole pass failed: every call in it gets the error
                out = [exc] * len(rows)
            for i, result in zip(rows, out, strict=True):
                results[i] = result
        return results

    async def GetModel(self, request: Any, grpc_context: Any):
        try:
            error = refused(request)
            if error is not None:
                raise error
            chunks = self.core.get_model(request.model_id, request.version, request.offset, request.chunk_size,
                                         metadata_of(grpc_context), peer_address(grpc_context.peer()))
        except Exception as exc:
            _answer(grpc_context, "GetModel", exc)
            raise _Answered(grpc_context.details()) from None  # a stream ends with its status by raising
        for chunk in chunks:
            yield chunk_message(chunk)

    async def ListModels(self, request: Any, grpc_context: Any) -> pb.ListModelsResponse:
        try:
            error = refused(request)
            if error is not None:
                raise error
            return models_message(self.core.list_models(metadata_of(grpc_context)))
        except Exception as exc:
            _answer(grpc_context, "ListModels", exc)
            return pb.ListModelsResponse()

    async def Check(self, request: Any, grpc_context: Any) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check through the proxy: a replica answering is a serving service."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _answer(context: Any, method: str, exc: Exception) -> None:
    answer = answer_for(method, exc)
    context.set_code(answer.code)
    context.set_details(answer.message)
    if answer.trailing_metadata:
        context.set_trailing_metadata(list(answer.trailing_metadata))


class RateLimits:
    """Every device's token bucket for one application, shared by all its replicas."""

    def __init__(self, rate: float, burst: float | None):
        self.limiter = RateLimiter(rate, burst)

    def take(self, keys: list[str]) -> list[tuple[float, str]]:
        """One token per key (`rate_key`), in order -> (0, "") when taken, else (seconds to wait, message)."""
        out = []
        for key in keys:
            try:
                self.limiter.check(key)
            except DeviceRateLimited as exc:
                out.append((exc.retry_after_s, str(exc)))
            else:
                out.append((0.0, ""))
        return out


class _SharedRates:
    """A replica's side of RateLimits: checks that arrive while one request to it is out travel
    together in the next, so a busy replica sends one request per round trip, not one per call."""

    def __init__(self, handle: Any):
        self.handle = handle
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    async def take(self, key: str) -> None:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((key, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        wait, message = await future
        if wait > 0:
            raise DeviceRateLimited(message, retry_after_s=wait)

    async def _send(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                answers = await self.handle.take.remote([key for key, _ in batch])
            except Exception as exc:
                log.warning("rate limits unreachable: %s", exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(Unavailable("the rate limiter is restarting; retry"))
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------


def replica_options(limits: Limits, scaling: Scaling) -> dict[str, Any]:
    """The Serve deployment options of the ParamService replicas."""
    scaling.check()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica, "num_gpus": scaling.gpus_per_replica},
        # Serve needs room for a full batch per replica; twice that lets the next batch gather
        # while one is generated.
        "max_ongoing_requests": 2 * limits.max_batch,
        "max_queued_requests": limits.max_queue,
        "graceful_shutdown_timeout_s": scaling.grace_s,
    }
    if scaling.autoscale is not None:
        low, high = scaling.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": limits.max_batch}
    else:
        options["num_replicas"] = scaling.replicas
    return options


def build_app(config: ServiceConfig, scaling: Scaling = Scaling()):
    """The Serve application: ParamService replicas, plus RateLimits when a rate is set."""
    if not config.models:
        raise InvalidInput("models", "a server needs at least one model")
    replica = serve.deployment(name="ParamService", **replica_options(config.limits, scaling))(ParamReplica)
    rate_limits = None
    if config.rate > 0:
        RateLimiter(config.rate, config.burst)  # the same checks of rate and burst as `paramcast serve`
        limiter = serve.deployment(name="RateLimits", num_replicas=1, max_ongoing_requests=1000,
                                   ray_actor_options={"num_cpus": 0})(RateLimits)
        rate_limits = limiter.bind(config.rate, config.burst)
    return replica.bind(config, rate_limits)


def start(port: int = 0, http_host: str = "127.0.0.1", reflection: bool = True) -> int:
    """Start Serve on the connected cluster with ParamService on its gRPC proxy -> the proxy's port
    (`port` 0: one the OS reports free). Serve's HTTP proxy, which ParamCast does not use, listens
    on `http_host` at a free port."""
    port = port or free_port()
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[ADD_SERVICE],
                                         enable_reflection=reflection),
                http_options=HTTPOptions(host=http_host, port=free_port(http_host)))
    return port


def deploy(config: ServiceConfig, scaling: Scaling = Scaling(), name: str = APP_NAME, port: int | None = None,
           timeout_s: float = 300.0) -> None:
    """Deploy (or update) the application `name` and wait until it answers through the proxy at `port`."""
    serve.run(build_app(config, scaling), name=name, route_prefix=f"/{name}")
    if port is not None:
        wait_serving(f"127.0.0.1:{port}", name, timeout_s)


def undeploy(name: str = APP_NAME) -> None:
    """Remove one application (its replicas drain first); Serve keeps running for the others."""
    serve.delete(name)


def shutdown() -> None:
    """Stop Serve on the cluster: every application, the proxies, the controller."""
    serve.shutdown()


def wait_serving(target: str, application: str | None = None, timeout_s: float = 120.0) -> None:
    """Until a health Check through the proxy says SERVING (the proxy learns new routes a moment
    after the application is up)."""
    from grpc_health.v1 import health_pb2_grpc

    metadata = (("application", application),) if application else None
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5, metadata=metadata)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
    raise Unavailable(f"{application or 'the application'} did not answer through {target} within "
                      f"{timeout_s:.0f}s ({last})")


# ---------------------------------------------------------------------------------------------
# Serve config files (KubeRay RayService, `serve run`)
# ---------------------------------------------------------------------------------------------

_LIMIT_KEYS = {"max_batch": "max_batch", "max_delay_ms": "max_delay_ms", "max_queue": "max_queue",
               "max_window": "max_window_items", "ttl_ms": "ttl_ms"}


def app_builder(args: Mapping[str, Any]):
    """The application from a Serve config's `args` (names as the CLI flags, with underscores):

        import_path: paramcast.cloud.service.ray_serve:app_builder
        args: {models: [/models/ml-100k], replicas: 2, max_batch: 64, max_delay_ms: 2,
               tokens: /secrets/tokens.json, rate_limit: 5, autoscale: "1:4", gpus_per_replica: 1}
    """
    args = dict(args)
    models = args.pop("models", None)
    if isinstance(models, str):
        models = [models]
    if not models:
        raise InvalidInput("models", "name at least one checkpoint directory")
    defaults = Limits()
    limits = Limits(**{name: type(getattr(defaults, name))(args.pop(key))
                       for key, name in _LIMIT_KEYS.items() if key in args})
    burst = args.pop("rate_burst", None)
    config = ServiceConfig(models=tuple(str(m) for m in models), limits=limits, tokens_file=args.pop("tokens", None),
                           rate=float(args.pop("rate_limit", 0.0)), burst=None if burst is None else float(burst),
                           threads=int(args.pop("threads", 0)))
    autoscale = args.pop("autoscale", None)
    scaling = Scaling(replicas=int(args.pop("replicas", 1)),
                      autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
                      cpus_per_replica=float(args.pop("cpus_per_replica", 1.0)),
                      gpus_per_replica=float(args.pop("gpus_per_replica", 0.0)),
                      grace_s=float(args.pop("grace", 10.0)))
    if args:
        known = sorted(["models", "tokens", "rate_limit", "rate_burst", "threads", "autoscale", "replicas",
                        "cpus_per_replica", "gpus_per_replica", "grace", *_LIMIT_KEYS])
        raise InvalidInput("args", f"unknown keys {sorted(args)}; known: {known}")
    return build_app(config, scaling)


"""ParamService behind Ray Serve's gRPC proxy: what that proxy does differently, met in one place.

Serve runs a grpc.aio server of its own on every node (the proxy). It learns the methods from
the functions named in `gRPCOptions(grpc_servicer_functions=[...])`, deserializes each request
with the handlers they register, picks the application (the `application` metadata key; with a
single application on the cluster the key may be left out) and forwards the message to one of
that application's replicas, which answers through a copy of the call context. Compared with
`paramcast serve` (cloud/service/server.py):

  no server interceptors   The proxy takes none, so `add_param_service` (the function to name in
                           grpc_servicer_functions) wraps the proxy's own entry point of every
                           method it registers (`_guard`), where the plain server has its
                           ErrorInterceptor (cloud/service/interceptor.py):
    - request bytes that do not parse: INVALID_ARGUMENT (the proxy alone would answer UNKNOWN
      with the parser's exception text);
    - requests larger than PARAMCAST_MAX_REQUEST_BYTES (read from the proxy's environment,
      64 KiB by default, as `--max-request-bytes`): RESOURCE_EXHAUSTED (the proxy's own bound
      is Ray's, gigabytes);
    - a call that ends inside Ray without a ParamCast answer - the replica serving it died, or
      Ray failed to deliver its result - is INTERNAL from the proxy, with actor ids in the
      text. The guard answers UNAVAILABLE instead, which the device client's retry policy
      retries (Generate and GetModel are idempotent, so a retry is always safe), and logs
      Ray's text under an incident id;
    - the call's deadline never reaches a replica; the guard forwards the time left as the
      metadata entry DEADLINE_METADATA_KEY, so a replica drops requests whose deadline passed
      while they waited for a batch, as the plain server does.
  health                   `/ray.serve.RayServeAPIService/Healthz` is the proxy's own check
                           (the proxy is up); `grpc.health.v1.Health/Check` is registered here
                           too and answered by a replica, so SERVING means a replica of the
                           application answered. `Watch` is not offered (UNIMPLEMENTED): an
                           open stream per watcher would hold a replica's request slot.
  streaming                Serve forwards unary and server-streaming calls alike: GetModel
                           streams its chunks from a replica through the proxy.
  not offered              TLS, gzip and a Prometheus port of our own: the proxy has no such
                           options; terminate TLS in front of it and read Serve's metrics from
                           Ray's metrics export. The proxy listens on every interface of every
                           node ([::]:PORT); Ray has no option to bind one address.

The wrapping reaches into one attribute Serve builds internally (the proxy server's
`service_handler_factory`), which is why the `ray` extra pins Ray's minor version. Without it the
service still runs, unguarded, and says so in the proxy's log; replicas then answer unparsable or
oversized requests themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from paramcast.cloud.service.interceptor import INCIDENT_PREFIX, Malformed, answer_for, safe_deserializer
from paramcast.common.errors import InvalidInput, ParamCastError, RateLimited
from paramcast.common.serde import SERVICE_NAME
from paramcast.v1 import param_service_pb2 as pb

log = logging.getLogger("paramcast.service")

MAX_REQUEST_BYTES_ENV = "PARAMCAST_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
DEADLINE_METADATA_KEY = "paramcast-deadline-ms"  # time the call has left, in ms, as the proxy saw it
HEALTH_SERVICE = "grpc.health.v1.Health"


class RequestTooLarge(RateLimited):
    """The request message is larger than the service accepts (RESOURCE_EXHAUSTED)."""


class Oversized:
    """Stands in for a request larger than the service accepts."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit

    def error(self) -> RequestTooLarge:
        return RequestTooLarge(f"request message is {self.size} bytes; at most {self.limit} are accepted")


def refused(request: Any) -> ParamCastError | None:
    """The error for a request that must not reach the service (unparsable or oversized), else None."""
    return request.error() if isinstance(request, (Malformed, Oversized)) else None


def _reader(message_cls, limit: int) -> Callable[[bytes], Any]:
    parse = safe_deserializer(message_cls.FromString, message_cls.DESCRIPTOR.name)

    def read(data: bytes):
        if len(data) > limit:
            return Oversized(len(data), limit)
        return parse(data)

    return read


# (service, method) -> (request type, response type, server streaming)
METHODS: dict[tuple[str, str], tuple[Any, Any, bool]] = {
    (SERVICE_NAME, "Generate"): (pb.GenerateRequest, pb.GenerateResponse, False),
    (SERVICE_NAME, "GetModel"): (pb.GetModelRequest, pb.GetModelResponse, True),
    (SERVICE_NAME, "ListModels"): (pb.ListModelsRequest, pb.ListModelsResponse, False),
    (HEALTH_SERVICE, "Check"): (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False),
}


def add_param_service(servicer: Any, server: Any) -> None:
    """For `gRPCOptions(grpc_servicer_functions=["paramcast.cloud.service.ray_proxy.add_param_service"])`:
    register ParamService and the health Check on Serve's gRPC proxy, each guarded (module docstring).

    Serve calls it in the proxy process with a placeholder servicer, and replaces each handler's
    behaviour with its route to a replica while the handlers are added; that route is wrapped here."""
    limit = int(os.environ.get(MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES))
    route = getattr(server, "service_handler_factory", None)
    if route is None:
        log.error("this Ray Serve proxy builds its handlers differently; ParamService runs unguarded "
                  "(see paramcast.cloud.service.ray_proxy)")
    else:
        server.service_handler_factory = functools.partial(_guarded_route, route)
    try:
        for service in dict.fromkeys(s for s, _ in METHODS):
            handlers = {}
            for (svc, method), (request_cls, response_cls, streaming) in METHODS.items():
                if svc != service:
                    continue
                make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
                handlers[method] = make(getattr(servicer, method), request_deserializer=_reader(request_cls, limit),
                                        response_serializer=response_cls.SerializeToString)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            if hasattr(server, "add_registered_method_handlers"):
                server.add_registered_method_handlers(service, handlers)
    finally:
        if route is not None:
            server.service_handler_factory = route


def _guarded_route(route: Callable, service_method: str, streaming_type: Any) -> Callable:
    """Serve's entry point for one method and streaming type, inside `_guard`."""
    inner = route(service_method=service_method, streaming_type=streaming_type)
    kind = getattr(streaming_type, "value", streaming_type)
    if kind == "unary_unary":
        return _guard_unary(service_method, inner)
    if kind == "unary_stream":
        return _guard_stream(service_method, inner)
    return inner  # client- and bidi-streaming: ParamService has none


def _guard_unary(method: str, inner: Callable):
    async def call(request: Any, context: grpc.aio.ServicerContext):
        error = refused(request)
        if error is not None:
            answer = answer_for(method, error)
            await context.abort(answer.code, answer.message)
        response = await inner(request, _Forwarded(context))
        await _answer_ray_failures(method, context)
        return response

    return call


def _guard_stream(method: str, inner: Callable):
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        error = refused(request)
        if error is not None:
            answer = answer_for(method, error)
            await context.abort(answer.code, answer.message)
        async for message in inner(request, _Forwarded(context)):
            yield message
        await _answer_ray_failures(method, context)

    return call


async def _answer_ray_failures(method: str, context: grpc.aio.ServicerContext) -> None:
    """INTERNAL that ParamCast did not write (its own carry an incident id) -> UNAVAILABLE.

    Answered by aborting: a status with no response headers before it is what a gRPC client
    may retry transparently (a call that received headers counts as committed)."""
    if context.code() != grpc.StatusCode.INTERNAL:
        return
    details = context.details() or ""
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    if details.startswith(INCIDENT_PREFIX):
        return
    incident = uuid.uuid4().hex[:12]
    log.warning("%s ended inside Ray without an answer (incident %s): %s", method, incident, details)
    await context.abort(grpc.StatusCode.UNAVAILABLE,
                        f"the replica serving this call stopped (incident {incident}); retry")


class _Forwarded:
    """The proxy's call context as the replica should see it: the client's metadata (minus any
    deadline entry it sent itself) plus the time the call has left."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        metadata = [(k, v) for k, v in (context.invocation_metadata() or ()) if k != DEADLINE_METADATA_KEY]
        remaining = context.time_remaining()
        if remaining is not None:
            metadata.append((DEADLINE_METADATA_KEY, str(max(0, int(remaining * 1000)))))
        self._metadata = tuple(metadata)

    def invocation_metadata(self):
        return self._metadata

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def deadline_from(metadata: dict[str, str], now: float) -> float | None:
    """The call's deadline as a time.monotonic() value on this process, from DEADLINE_METADATA_KEY."""
    value = metadata.get(DEADLINE_METADATA_KEY)
    if value is None:
        return None
    try:
        return now + int(value) / 1000.0
    except ValueError:
        raise InvalidInput(DEADLINE_METADATA_KEY, f"must be whole milliseconds, got {value!r}") from None

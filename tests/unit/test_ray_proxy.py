"""The guard around Ray Serve's gRPC proxy handlers, driven with a stand-in proxy server (no Ray)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from paramcast.cloud.service import ray_proxy
from paramcast.cloud.service.interceptor import INCIDENT_PREFIX, Malformed
from paramcast.common.serde import SERVICE_NAME
from paramcast.v1 import param_service_pb2 as pb


class Aborted(Exception):
    pass


class Context:
    """What the proxy hands a handler: metadata, deadline, status setters, abort."""

    def __init__(self, metadata=(), remaining: float | None = 2.5):
        self.metadata, self.remaining = tuple(metadata), remaining
        self._code, self._details = None, None

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self):
        return self.remaining

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    async def abort(self, code, details):
        self._code, self._details = code, details
        raise Aborted(details)


class ProxyServer:
    """Serve's proxy server as `add_param_service` meets it: handlers registered while its route
    factory is in place get their behaviour replaced by the factory's routes."""

    def __init__(self, route):
        self.service_handler_factory = route
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, generic_handlers):
        for path, handler in generic_handlers[0]._method_handlers.items():
            kind = "unary_stream" if handler.response_streaming else "unary_unary"
            self.handlers[path] = handler._replace(**{kind: self.service_handler_factory(
                service_method=path, streaming_type=kind)})

    def add_registered_method_handlers(self, service, handlers):
        self.registered.append(service)


def _proxy(answer):
    """A proxy whose route answers every call with `answer(context)` and records what it saw."""
    seen = []

    def route(service_method, streaming_type):
        async def unary(request, context):
            seen.append((service_method, request, dict(context.invocation_metadata())))
            answer(context)
            return b""

        async def stream(request, context):
            seen.append((service_method, request, dict(context.invocation_metadata())))
            yield b"chunk"
            answer(context)

        return stream if streaming_type == "unary_stream" else unary

    server = ProxyServer(route)
    ray_proxy.add_param_service(SimpleNamespace(Generate=None, GetModel=None, ListModels=None, Check=None), server)
    return server, seen, route


def test_registers_param_service_and_health_check_and_restores_the_factory():
    server, _, route = _proxy(lambda context: None)
    assert server.service_handler_factory is route  # only the handlers added here are wrapped
    assert set(server.handlers) == {f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/GetModel",
                                    f"/{SERVICE_NAME}/ListModels", "/grpc.health.v1.Health/Check"}
    assert server.registered == [SERVICE_NAME, "grpc.health.v1.Health"]
    read = server.handlers[f"/{SERVICE_NAME}/Generate"].request_deserializer
    assert isinstance(read(b"\x0a\xff\xff\xff\xff"), Malformed)
    assert isinstance(read(b"\x00" * (ray_proxy.DEFAULT_MAX_REQUEST_BYTES + 1)), ray_proxy.Oversized)
    assert read(pb.GenerateRequest(device_id="d").SerializeToString()).device_id == "d"


def test_unreadable_and_oversized_requests_are_answered_at_the_proxy():
    server, seen, _ = _proxy(lambda context: None)
    call = server.handlers[f"/{SERVICE_NAME}/Generate"].unary_unary
    for request, code in ((Malformed("GenerateRequest"), grpc.StatusCode.INVALID_ARGUMENT),
                          (ray_proxy.Oversized(70_000, 65_536), grpc.StatusCode.RESOURCE_EXHAUSTED)):
        context = Context()
        with pytest.raises(Aborted):
            asyncio.run(call(request, context))
        assert context.code() == code
    assert seen == []  # no replica was asked
    assert "not a valid GenerateRequest" in str(Malformed("GenerateRequest").error())


def test_the_replica_sees_the_time_left_and_never_a_deadline_the_client_made_up():
    server, seen, _ = _proxy(lambda context: None)
    call = server.handlers[f"/{SERVICE_NAME}/Generate"].unary_unary
    context = Context([("authorization", "Bearer t"), (ray_proxy.DEADLINE_METADATA_KEY, "999999")], remaining=2.5)
    asyncio.run(call(pb.GenerateRequest(), context))
    metadata = seen[0][2]
    assert metadata == {"authorization": "Bearer t", ray_proxy.DEADLINE_METADATA_KEY: "2500"}
    assert ray_proxy.deadline_from(metadata, now=100.0) == pytest.approx(102.5)
    assert ray_proxy.deadline_from({}, now=100.0) is None
    asyncio.run(call(pb.GenerateRequest(), Context(remaining=None)))
    assert ray_proxy.DEADLINE_METADATA_KEY not in seen[1][2]


@pytest.mark.parametrize("method", ["Generate", "GetModel"])
def test_a_call_lost_inside_ray_is_answered_unavailable_so_clients_retry(method):
    def replica_died(context):
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("The actor died unexpectedly before finishing this task. pid: 4242")

    server, _, _ = _proxy(replica_died)
    handler = server.handlers[f"/{SERVICE_NAME}/{method}"]
    context = Context()

    async def run():
        if handler.unary_stream is not None:
            return [m async for m in handler.unary_stream(pb.GetModelRequest(), context)]
        return await handler.unary_unary(pb.GenerateRequest(), context)

    with pytest.raises(Aborted):
        asyncio.run(run())
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert "pid" not in context.details() and "incident" in context.details()


def test_paramcast_own_internal_errors_and_other_codes_pass_through():
    for code, details in ((grpc.StatusCode.INTERNAL, f"{INCIDENT_PREFIX}0123456789ab)"),
                          (grpc.StatusCode.NOT_FOUND, "Application metadata not set."),
                          (grpc.StatusCode.INVALID_ARGUMENT, "window: item id 0 is outside [1, 9]")):
        def answer(context, code=code, details=details):
            context.set_code(code)
            context.set_details(details)

        server, _, _ = _proxy(answer)
        context = Context()
        asyncio.run(server.handlers[f"/{SERVICE_NAME}/Generate"].unary_unary(pb.GenerateRequest(), context))
        assert (context.code(), context.details()) == (code, details)

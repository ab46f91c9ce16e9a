"""The interceptor every ParamService call passes: typed errors become status codes here.

The servicer and the core raise domain errors (`common.errors`); `ErrorInterceptor` answers each
with the status code the .proto documents (`common.status`, the one table both directions read),
with the error's own message (they are written for the caller and name the field at fault) and,
for a rate-limited device, the `retry-after-ms` trailer. Anything else becomes INTERNAL with a
generic message and an incident id; the traceback goes to the server log under the same id, never
to the client.

The interceptor also owns the two things every call needs once: request bytes that do not parse
are answered INVALID_ARGUMENT (gRPC's default would be UNKNOWN with the parser's exception text),
and each call's outcome is counted in the metrics by status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from paramcast.common.errors import InvalidInput
from paramcast.common.status import status_of, trailers_of

log = logging.getLogger("paramcast.service")


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str):
        self.type_name = type_name


def _safe_deserializer(deserialize: Callable[[bytes], object] | None, type_name: str):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # any parser failure: the bytes are not a valid message of this type
            return _Malformed(type_name)

    return parse


class CallRecorder:
    """What the interceptor reports per finished call (implemented by cloud.service.metrics)."""

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:  # pragma: no cover
        pass


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed errors to status codes for every method of `service_name`; other services
    (health, reflection) pass through untouched."""

    def __init__(self, service_name: str, recorder: CallRecorder | None = None):
        self.prefix = f"/{service_name}/"
        self.recorder = recorder or CallRecorder()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or not method_path.startswith(self.prefix):
            return handler
        method = method_path[len(self.prefix):]
        deserializer = _safe_deserializer(handler.request_deserializer, f"{method}Request")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # ParamService has no client-streaming methods

    def _wrap_unary(self, method: str, behaviour):
        async def call(request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, _Malformed):
                    raise InvalidInput("request", f"not a valid {request.type_name} message")
                return await behaviour(request, context)
            except BaseException as exc:
                code, message = self._status(method, exc, context)
                if message is None:
                    raise
                await context.abort(code, message)  # raises AbortError, which ends the call
            finally:
                self.recorder.call_finished(method, code, time.perf_counter() - start)

        return call

    def _wrap_stream(self, method: str, behaviour):
        async def call(request, context: grpc.aio.ServicerContext) -> AsyncIterator:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, _Malformed):
                    raise InvalidInput("request", f"not a valid {request.type_name} message")
                async for response in behaviour(request, context):
                    yield response
            except BaseException as exc:
                code, message = self._status(method, exc, context)
                if message is None:
                    raise
                await context.abort(code, message)
            finally:
                self.recorder.call_finished(method, code, time.perf_counter() - start)

        return call

    def _status(self, method: str, exc: BaseException, context: grpc.aio.ServicerContext,
                ) -> tuple[grpc.StatusCode, str | None]:
        """The status and message to answer `exc` with; message None = re-raise, nobody to answer."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # The client went away, or its deadline passed and gRPC cancelled the handler.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED), None
        if isinstance(exc, grpc.aio.AbortError):
            return context.code() or grpc.StatusCode.UNKNOWN, None  # already answered
        code = status_of(exc)
        if code is None:
            incident = uuid.uuid4().hex[:12]
            log.error("%s failed (incident %s)", method, incident, exc_info=exc)
            return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"
        trailers = trailers_of(exc)
        if trailers:  # machine-readable hints beside the status (a rate-limited device's wait)
            context.set_trailing_metadata(trailers)
        return code, str(exc)

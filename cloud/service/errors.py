"""Typed errors to gRPC status codes, in one place: the interceptor every ParamService call passes.

The servicer and the core raise domain errors (`common.errors`, plus the service's own below);
`ErrorInterceptor` turns each into the status code the .proto documents, with the error's own
message (they are written for the caller and name the field at fault). Anything else becomes
INTERNAL with a generic message and an incident id; the traceback goes to the server log under
the same id, never to the client.

The interceptor also owns the two things every call needs once: request bytes that do not parse
are answered INVALID_ARGUMENT (gRPC's default would be UNKNOWN with the parser's exception text),
and each call's outcome is counted in the metrics by status code.

Streams are written by the interceptor itself (`context.write`), so a client that goes away in
the middle of one -- a device abandoning a GetModel download it will resume later, the case the
contract is designed for -- is recognised where the write fails, logged at INFO as a cancelled
stream and counted as CANCELLED, instead of reaching gRPC's own handler as an error with a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import grpc

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

log = logging.getLogger("paramcast.service")


class OutOfRange(InvalidInput):
    """A position (GetModel offset) beyond the end of what exists."""


class DeadlineExpired(ParamCastError):
    """The call's deadline passed while it waited for the generator; it was dropped before compute."""


class DeviceRateLimited(RateLimited):
    """One device exceeded its request rate; `retry_after_s` says when a token is next available."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Overloaded(RateLimited):
    """The generation queue is full: the server as a whole is over capacity."""


class ShuttingDown(ParamCastError):
    """The server is draining and accepts no new work."""


# Most specific first: OutOfRange is an InvalidInput, DeviceRateLimited a RateLimited.
_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
)
# Errors that mean the server itself is broken (e.g. a package file that no longer verifies):
# the caller learns nothing useful from their text, so they are treated like any unexpected error.
_INTERNAL_ONLY = (IntegrityError,)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code a typed error maps to; None for anything that must become INTERNAL."""
    if isinstance(exc, _INTERNAL_ONLY):
        return None
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return None


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
        async def call(request, context: grpc.aio.ServicerContext) -> None:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            sent = 0
            try:
                if isinstance(request, _Malformed):
                    raise InvalidInput("request", f"not a valid {request.type_name} message")
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        try:
                            await context.write(response)
                        except Exception as exc:  # a write fails only when the stream is gone: the client left
                            code = grpc.StatusCode.CANCELLED
                            log.info("%s stream cancelled by the client after %d messages (%s)", method, sent,
                                     type(exc).__name__)
                            return
                        sent += 1
            except BaseException as exc:
                code, message = self._status(method, exc, context)
                if message is None:
                    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                        log.info("%s stream ended by the client after %d messages (%s)", method, sent, code.name)
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
        if isinstance(exc, DeviceRateLimited):
            # Machine-readable hint beside the status, so a client can wait exactly that long.
            context.set_trailing_metadata((("retry-after-ms", str(max(1, round(exc.retry_after_s * 1000)))),))
        return code, str(exc)

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

Streams are written by the interceptor itself (`context.write`), so a client that goes away in
the middle of one -- a device abandoning a GetModel download it will resume later, the case the
contract is designed for -- is recognised where the write fails, logged at INFO as a cancelled
stream and counted as CANCELLED, instead of reaching gRPC's own handler as an error with a
traceback. A unary answer is sent by gRPC after the handler returns, so a client that leaves at
that moment (killed, or its deadline just passing) still fails gRPC's send; `ClientGoneFilter`
keeps that record, at INFO and without the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from paramcast.common.errors import InvalidInput
from paramcast.common.status import status_of, trailers_of

log = logging.getLogger("paramcast.service")


class Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def error(self) -> InvalidInput:
        return InvalidInput("request", f"not a valid {self.type_name} message")


def safe_deserializer(deserialize: Callable[[bytes], object] | None, type_name: str):
    """`deserialize` that returns a Malformed instead of raising on bytes that do not parse."""
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # any parser failure: the bytes are not a valid message of this type
            return Malformed(type_name)

    return parse


INCIDENT_PREFIX = "internal error (incident "  # every INTERNAL answer ParamCast writes starts so


@dataclass(frozen=True)
class Answer:
    """What a call that raised is answered with."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()


def answer_for(method: str, exc: BaseException) -> Answer:
    """The status code, message and trailing metadata for an error a ParamService method raised.

    Typed errors keep their own message (written for the caller) and their trailers (a rate-limited
    device's wait); anything else becomes INTERNAL with an incident id, its traceback logged here
    under that id and never sent.
    """
    code = status_of(exc)
    if code is None:
        incident = uuid.uuid4().hex[:12]
        log.error("%s failed (incident %s)", method, incident, exc_info=exc)
        return Answer(grpc.StatusCode.INTERNAL, f"{INCIDENT_PREFIX}{incident})")
    return Answer(code, str(exc), tuple(trailers_of(exc) or ()))


class CallRecorder:
    """What the interceptor reports per finished call (implemented by cloud.service.metrics)."""

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:  # pragma: no cover
        pass


class ClientGoneFilter(logging.Filter):
    """gRPC's asyncio server logs ERROR with a traceback (`ExecuteBatchError raised in core by
    servicer method [...]`) when it cannot send a handler's answer because the call is gone: its
    client went away. That is routine for devices (killed, out of deadline, done with a download
    they will resume); the record stays, at INFO, without the traceback."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self.PREFIX):
            record.msg = "%s: the client left before its answer could be sent"
            record.args = (record.args[0],) if isinstance(record.args, tuple) and record.args else ("a call",)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


def quiet_client_gone() -> None:
    """Install ClientGoneFilter on gRPC's server logger (once per process)."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
        logger.addFilter(ClientGoneFilter())


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed errors to status codes for every method of `service_name`; other services
    (health, reflection) pass through untouched."""

    def __init__(self, service_name: str, recorder: CallRecorder | None = None):
        self.prefix = f"/{service_name}/"
        quiet_client_gone()
        self.recorder = recorder or CallRecorder()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or not method_path.startswith(self.prefix):
            return handler
        method = method_path[len(self.prefix):]
        deserializer = safe_deserializer(handler.request_deserializer, f"{method}Request")
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
                if isinstance(request, Malformed):
                    raise request.error()
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
                if isinstance(request, Malformed):
                    raise request.error()
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
        answer = answer_for(method, exc)
        if answer.trailing_metadata:  # machine-readable hints beside the status (a rate-limited device's wait)
            context.set_trailing_metadata(answer.trailing_metadata)
        return answer.code, answer.message

"""Typed errors and gRPC status codes: the one table, read both ways.

The server's interceptor (`cloud/service/interceptor.py`) answers each typed error with the status
code the .proto documents (`status_of`); the device client turns each status it receives back
into a typed error (`error_from_status`). Both read `_TABLE`, so the two sides cannot drift.
Statuses that mean "no answer, try again later" (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) become
`CloudUnavailable` on the client, whatever the server meant by them.

A rate-limited call carries a machine-readable hint beside its status: the `retry-after-ms`
trailer, the milliseconds until the device's next request would be admitted. The server sets it
from `DeviceRateLimited.retry_after_s`; the client reads it back into the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from grpc import StatusCode

from paramcast.common.errors import (
    CloudUnavailable,
    DeadlineExpired,
    DeviceRateLimited,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    OutOfRange,
    ParamCastError,
    PermissionDenied,
    RateLimited,
    RemoteError,
    Unauthenticated,
    Unavailable,
    VersionMismatch,
)

RETRY_AFTER_KEY = "retry-after-ms"

Metadata = dict[str, str]


def _rate_limited(message: str, trailers: Metadata) -> ParamCastError:
    try:
        wait_ms = int(trailers.get(RETRY_AFTER_KEY, ""))
    except ValueError:
        return RateLimited(message)  # the server as a whole is overloaded: no per-device hint
    return DeviceRateLimited(message, retry_after_s=max(0, wait_ms) / 1000)


def _unavailable(code: StatusCode) -> Callable[[str, Metadata], ParamCastError]:
    return lambda message, _: CloudUnavailable(f"{code.name}: {message}")


# (what the server raises, the status it answers with, what the client raises for that status).
# Most specific first: OutOfRange is an InvalidInput, DeviceRateLimited a RateLimited.
_TABLE: tuple[tuple[type[BaseException], StatusCode, Callable[[str, Metadata], ParamCastError]], ...] = (
    (OutOfRange, StatusCode.OUT_OF_RANGE, lambda m, _: OutOfRange("offset", m)),
    (InvalidInput, StatusCode.INVALID_ARGUMENT, lambda m, _: InvalidInput("request", m)),
    (ModelNotFound, StatusCode.NOT_FOUND, lambda m, _: ModelNotFound(m)),
    (VersionMismatch, StatusCode.FAILED_PRECONDITION, lambda m, _: VersionMismatch(m)),
    (Unauthenticated, StatusCode.UNAUTHENTICATED, lambda m, _: Unauthenticated(m)),
    (PermissionDenied, StatusCode.PERMISSION_DENIED, lambda m, _: PermissionDenied(m)),
    (RateLimited, StatusCode.RESOURCE_EXHAUSTED, _rate_limited),
    (DeadlineExpired, StatusCode.DEADLINE_EXCEEDED, _unavailable(StatusCode.DEADLINE_EXCEEDED)),
    (Unavailable, StatusCode.UNAVAILABLE, _unavailable(StatusCode.UNAVAILABLE)),
)
_FROM_STATUS = {code: make for _, code, make in _TABLE} | {StatusCode.CANCELLED: _unavailable(StatusCode.CANCELLED)}
# Errors that mean the server itself is broken (e.g. a package file that no longer verifies):
# the caller learns nothing useful from their text, so they are treated like any unexpected error.
_INTERNAL_ONLY = (IntegrityError,)


def status_of(exc: BaseException) -> StatusCode | None:
    """The status code a typed error is answered with; None for anything that must become INTERNAL."""
    if isinstance(exc, _INTERNAL_ONLY):
        return None
    for cls, code, _ in _TABLE:
        if isinstance(exc, cls):
            return code
    return None


def trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with the status of `exc`: the retry hint of a rate-limited device."""
    if isinstance(exc, DeviceRateLimited):
        return ((RETRY_AFTER_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
    return ()


def error_from_status(code: StatusCode, details: str | None, trailers: Iterable[tuple[str, str | bytes]] = ()
                      ) -> ParamCastError:
    """The typed error for a call that ended with `code`; `.code` keeps the status code."""
    message = details or code.name
    text = {k: v for k, v in trailers if isinstance(v, str)}
    make = _FROM_STATUS.get(code)
    err = make(message, text) if make else RemoteError(f"{code.name}: {message}")
    err.code = code
    return err

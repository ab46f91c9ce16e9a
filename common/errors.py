"""Typed domain errors shared by the cloud and the device.

Code raises these; one table maps them to gRPC status codes and back (`common/status.py`, read by
the server's interceptor and by the device client), and the CLI prints their message. Nothing
here knows about gRPC.
"""

from __future__ import annotations

import os
from typing import Any


class ParamCastError(Exception):
    """Base class of every error ParamCast raises on purpose."""

    code: Any = None  # the gRPC status code, on an error made from a server's answer (common/status.py)


class DataFormatError(ParamCastError, ValueError):
    """An interaction file is malformed; the message names file, line and problem."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


class InvalidInput(ParamCastError, ValueError):
    """A request or argument is malformed; `field` names what was wrong."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


class ModelNotFound(ParamCastError, LookupError):
    """The named model id (or version) is not served here."""


class VersionMismatch(ParamCastError):
    """A bundle or request names a base version other than the one held; says which is current."""

    def __init__(self, message: str, latest: str | None = None):
        self.latest = latest
        super().__init__(message)


class IntegrityError(ParamCastError, ValueError):
    """Bytes failed to decode, or a checksum or sha256 did not match."""


class Unauthenticated(ParamCastError):
    """No or unknown credentials."""


class PermissionDenied(ParamCastError):
    """Credentials are valid but do not allow this device id."""


class RateLimited(ParamCastError):
    """The device exceeded its request rate."""


class DeviceRateLimited(RateLimited):
    """One device exceeded its request rate; `retry_after_s` says when a token is next available."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class Overloaded(RateLimited):
    """The generation queue is full: the server as a whole is over capacity."""


class OutOfRange(InvalidInput):
    """A position (GetModel offset) beyond the end of what exists."""


class DeadlineExpired(ParamCastError):
    """The call's deadline passed while it waited for the generator; it was dropped before compute."""


class Unavailable(ParamCastError):
    """The service cannot answer this call now (a part of it is restarting or draining); safe to retry."""


class ShuttingDown(Unavailable):
    """The server is draining and accepts no new work."""


class CloudUnavailable(ParamCastError):
    """The cloud could not be reached or did not answer in time; try again later."""


class RemoteError(ParamCastError):
    """The server answered with a status ParamCast does not map to a more specific error."""


class DeviceMismatch(IntegrityError):
    """A bundle generated for another device (or for none): a device applies only its own."""


class PackageTooLarge(ParamCastError):
    """The server offers a package larger than this device accepts (or has room for)."""

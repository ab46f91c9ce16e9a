"""Typed domain errors shared by the cloud and the device.

Code raises these; the gRPC layer maps them to status codes in one place
(`cloud/service/errors.py`), and the CLI prints their message.
"""

from __future__ import annotations

import os


class ParamCastError(Exception):
    """Base class of every error ParamCast raises on purpose."""


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


class DeviceMismatch(IntegrityError):
    """A bundle generated for another device (or for none): a device applies only its own."""

"""A package download on the device's disk: verified chunk by chunk, resumable across calls and processes.

    download = Download("state/", "sasrec-ml-100k")   # picks up ROOT/downloads/MODEL_ID.part if there is one
    for chunk in <GetModel stream from download.offset>:
        if download.accept(chunk): break              # this version is already unpacked here
    package = download.finish()                       # whole-archive sha256, unpacked atomically, verified

The gRPC calls are the client's (`device/client.py`); this module holds what a download keeps
on disk and every check a chunk passes before a byte of it is written.

A download never takes more than it was promised or than the device allows: a package larger than
the device's limit (`max_bytes`) or its free disk space is refused before a byte is written,
unpacking writes each file no larger than the manifest declares (common/package.py), and a
complete archive that fails to unpack is discarded, so the next attempt fetches it again instead
of failing on the same bytes for ever. Whatever odd thing sits where the partial file, its
identity or the unpacked package belong (a directory, a FIFO, a link) is cleared, and temporaries
of writers and unpackers killed mid-way are swept (common/files.py).

Between attempts (`next_attempt`): a stream the server throttled (RESOURCE_EXHAUSTED with
`retry-after-ms`: the device's download byte rate) waits as long as the server said and is not a
failure; a broken one backs off, at most `max_resumes` times; neither waits past the download's
overall deadline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from paramcast.common.errors import (
    CloudUnavailable,
    DeviceRateLimited,
    IntegrityError,
    ModelNotFound,
    PackageTooLarge,
    ParamCastError,
)
from paramcast.common.files import check_name, is_plain_name, read_regular, remove, sweep_temporaries
from paramcast.common.package import MAX_ARCHIVE_BYTES, DevicePackage, unpack_package
from paramcast.device.store import write_atomic

log = logging.getLogger("paramcast.device")

Progress = Callable[[int, int], None]  # (bytes held, total bytes)

PACKAGES_DIR = "packages"
DOWNLOADS_DIR = "downloads"
MAX_META_BYTES = 64 * 1024  # the .part.json beside a partial download is a few hundred bytes


def package_dir(root: str | Path, model_id: str, version: str) -> Path:
    """Where a device keeps an unpacked package: ROOT/packages/MODEL_ID-VERSION."""
    for name, value in (("model_id", model_id), ("version", version)):
        if not is_plain_name(value):
            raise IntegrityError(f"{name} {str(value)[:80]!r} cannot name a directory")
    return Path(root) / PACKAGES_DIR / f"{model_id}-{version}"


class Download:
    """Bytes of one package archive arriving in order, written to ROOT/downloads/MODEL_ID.part.

    Only verified chunks are written (each chunk's sha256, then contiguity and a consistent
    total size and archive hash), and the archive's identity (version, size, sha256) is kept
    beside the partial file, so a later call resumes where this one stopped, even in another
    process, and never splices two different archives together.
    """

    def __init__(self, root: str | Path, model_id: str, version: str, max_bytes: int = MAX_ARCHIVE_BYTES):
        self.root, self.model_id, self.requested = Path(root), check_name("model_id", model_id), version
        self.max_bytes = max_bytes
        folder = self.root / DOWNLOADS_DIR
        if folder.exists() and not folder.is_dir():
            remove(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for swept in (folder, self.root / PACKAGES_DIR):  # temporaries of writers and unpackers killed mid-way
            sweep_temporaries(swept)
        self.part = folder / f"{model_id}.part"
        self.meta_file = folder / f"{model_id}.part.json"
        self.meta: dict | None = None
        self.offset = 0
        self.held: DevicePackage | None = None  # set when the server's version is already unpacked here
        self._resume()

    def _resume(self) -> None:
        try:
            meta = json.loads(read_regular(self.meta_file, MAX_META_BYTES))
            info = os.lstat(self.part)
        except (OSError, ValueError):  # nothing held, or something odd held: start over
            self.reset()
            return
        if (not stat.S_ISREG(info.st_mode) or not isinstance(meta, dict)
                or (self.requested and meta.get("version") != self.requested)
                or not isinstance(meta.get("total_size"), int) or info.st_size > meta["total_size"]
                or meta["total_size"] > self.max_bytes):
            self.reset()
            return
        size = info.st_size
        self.meta, self.offset = meta, size
        log.info("resuming the download of %s %s at byte %d of %d", self.model_id, meta["version"], size,
                 meta["total_size"])

    def reset(self) -> None:
        remove(self.part)
        remove(self.meta_file)
        self.meta, self.offset = None, 0

    @property
    def version(self) -> str:
        """The version to ask for: the one being resumed, else the one requested ("" = the latest)."""
        return self.meta["version"] if self.meta else self.requested

    @property
    def complete(self) -> bool:
        return self.meta is not None and self.offset == self.meta["total_size"]

    def accept(self, msg) -> bool:
        """Verify and write one chunk; True when the rest is not needed (this version is already held)."""
        if msg.model_id != self.model_id:
            raise IntegrityError(f"GetModel answered for model {msg.model_id!r}, not {self.model_id!r}")
        if len(msg.chunk_sha256) != 32 or hashlib.sha256(msg.data).digest() != msg.chunk_sha256:
            raise IntegrityError(f"chunk at offset {msg.offset}: sha256 does not match its data")
        identity = {"version": msg.version, "total_size": msg.total_size, "archive_sha256": msg.archive_sha256.hex()}
        if self.meta is None:
            if not msg.version or msg.total_size < 0 or len(msg.archive_sha256) != 32:
                raise IntegrityError("GetModel response without a version, size or archive sha256")
            if self.requested and msg.version != self.requested:
                raise IntegrityError(f"asked for version {self.requested!r}, got {msg.version!r}")
            self.held = self._held(msg.version)
            if self.held is not None:
                return True
            self._check_room(msg.total_size)
            self.meta = identity
            write_atomic(self.meta_file, json.dumps(identity).encode())
        elif identity != self.meta:
            raise IntegrityError("the archive changed during the download (version, size or sha256 differ)")
        if msg.offset != self.offset:
            raise IntegrityError(f"chunk at offset {msg.offset}, expected {self.offset}")
        if self.offset + len(msg.data) > msg.total_size:
            raise IntegrityError(f"chunk at offset {msg.offset} runs past the archive's {msg.total_size} bytes")
        with open(self.part, "ab") as f:
            f.write(msg.data)
        self.offset += len(msg.data)
        return False

    def _check_room(self, total_size: int) -> None:
        """Refuse, before writing anything, a package above the device's limit or its free space."""
        if total_size > self.max_bytes:
            raise PackageTooLarge(f"the server offers a {total_size}-byte package of {self.model_id}; this device "
                                  f"accepts at most {self.max_bytes} bytes (max_package_bytes)")
        free = shutil.disk_usage(self.part.parent).free
        if total_size > free:
            raise PackageTooLarge(f"the {total_size}-byte package of {self.model_id} does not fit in the "
                                  f"{free} bytes free under {self.part.parent}")

    def _held(self, version: str) -> DevicePackage | None:
        """The package of `version` if it is already unpacked here and still verifies."""
        dest = package_dir(self.root, self.model_id, version)
        if not os.path.lexists(dest):
            return None
        try:
            return DevicePackage.load(dest)
        except (IntegrityError, ModelNotFound) as exc:
            log.warning("the held copy of %s %s is damaged (%s); downloading it again", self.model_id, version, exc)
            remove(dest)
            return None

    def finish(self) -> DevicePackage:
        """Check the whole archive's sha256, unpack it atomically, verify it; -> the package."""
        assert self.meta is not None and self.complete
        digest = hashlib.sha256()
        with open(self.part, "rb") as f:  # (a regular file: _resume and reset saw to it)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        if digest.hexdigest() != self.meta["archive_sha256"]:
            self.reset()
            raise IntegrityError("downloaded package: archive sha256 does not match; the download starts over")
        version = self.meta["version"]
        dest = package_dir(self.root, self.model_id, version)
        package = self._held(version)  # already unpacked by an earlier download of the same version
        if package is None:
            try:
                package = unpack_package(self.part, dest, max_bytes=self.max_bytes)
            except IntegrityError:
                self.reset()  # complete and as the server sent it, yet not a package: fetch it afresh
                raise
        self.reset()
        if (package.model_id, package.base_version) != (self.model_id, version):
            remove(dest)
            raise IntegrityError(f"the package served as {self.model_id} {version} is "
                                 f"{package.model_id} {package.base_version}")
        return package


def backoff(attempt: int, initial: float = 0.2, maximum: float = 5.0) -> float:
    """Full jitter: random(0, min(initial * 2^attempt, maximum))."""
    return random.uniform(0, min(initial * 2**attempt, maximum))


def can_resume(err: BaseException) -> bool:
    """A broken stream or a bad chunk: resume from what was verified and written so far."""
    return isinstance(err, (CloudUnavailable, IntegrityError))


def next_attempt(err: ParamCastError, failures: int, max_resumes: int, deadline: float) -> tuple[float, int]:
    """After a download attempt failed with `err`: (seconds to wait, failures so far), or raise `err`.

    A throttled stream (DeviceRateLimited: the server's retry hint) waits as long as the server said
    and is not a failure; a broken one backs off, at most `max_resumes` times; neither waits past
    the download's `deadline` (a time.monotonic() value)."""
    if isinstance(err, DeviceRateLimited):
        delay = err.retry_after_s
    elif can_resume(err) and failures < max_resumes:
        delay, failures = backoff(failures), failures + 1
    else:
        raise err
    if time.monotonic() + delay > deadline:
        raise err
    return delay, failures


def remaining(deadline: float) -> float:
    """Seconds left until `deadline` (a time.monotonic() value), at least a tenth of a second."""
    return max(0.1, deadline - time.monotonic())

"""A package download on the device's disk: verified chunk by chunk, resumable across calls and processes.

    download = Download("state/", "sasrec-ml-100k")   # picks up ROOT/downloads/MODEL_ID.part if there is one
    for chunk in <GetModel stream from download.offset>:
        if download.accept(chunk): break              # this version is already unpacked here
    package = download.finish()                       # whole-archive sha256, unpacked atomically, verified

The gRPC calls are the client's (`device/client.py`); this module holds what a download keeps
on disk and every check a chunk passes before a byte of it is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from paramcast.common.errors import CloudUnavailable, IntegrityError, InvalidInput, ModelNotFound
from paramcast.common.package import DevicePackage, unpack_package
from paramcast.device.store import write_atomic

log = logging.getLogger("paramcast.device")

Progress = Callable[[int, int], None]  # (bytes held, total bytes)

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PACKAGES_DIR = "packages"
DOWNLOADS_DIR = "downloads"


def package_dir(root: str | Path, model_id: str, version: str) -> Path:
    """Where a device keeps an unpacked package: ROOT/packages/MODEL_ID-VERSION."""
    for name, value in (("model_id", model_id), ("version", version)):
        if not _SAFE.match(value):
            raise IntegrityError(f"{name} {value[:80]!r} cannot name a directory")
    return Path(root) / PACKAGES_DIR / f"{model_id}-{version}"


class Download:
    """Bytes of one package archive arriving in order, written to ROOT/downloads/MODEL_ID.part.

    Only verified chunks are written (each chunk's sha256, then contiguity and a consistent
    total size and archive hash), and the archive's identity (version, size, sha256) is kept
    beside the partial file, so a later call resumes where this one stopped, even in another
    process, and never splices two different archives together.
    """

    def __init__(self, root: str | Path, model_id: str, version: str):
        if not _SAFE.match(model_id):
            raise InvalidInput("model_id", f"{model_id[:80]!r} cannot name a file")
        self.root, self.model_id, self.requested = Path(root), model_id, version
        folder = self.root / DOWNLOADS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.part = folder / f"{model_id}.part"
        self.meta_file = folder / f"{model_id}.part.json"
        self.meta: dict | None = None
        self.offset = 0
        self.held: DevicePackage | None = None  # set when the server's version is already unpacked here
        self._resume()

    def _resume(self) -> None:
        try:
            meta = json.loads(self.meta_file.read_text())
            size = self.part.stat().st_size
        except (OSError, ValueError):
            self.reset()
            return
        if (not isinstance(meta, dict) or (self.requested and meta.get("version") != self.requested)
                or not isinstance(meta.get("total_size"), int) or size > meta["total_size"]):
            self.reset()
            return
        self.meta, self.offset = meta, size
        log.info("resuming the download of %s %s at byte %d of %d", self.model_id, meta["version"], size,
                 meta["total_size"])

    def reset(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta_file.unlink(missing_ok=True)
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

    def _held(self, version: str) -> DevicePackage | None:
        """The package of `version` if it is already unpacked here and still verifies."""
        dest = package_dir(self.root, self.model_id, version)
        if not dest.exists():
            return None
        try:
            return DevicePackage.load(dest)
        except (IntegrityError, ModelNotFound) as exc:
            log.warning("the held copy of %s %s is damaged (%s); downloading it again", self.model_id, version, exc)
            shutil.rmtree(dest, ignore_errors=True)
            return None

    def finish(self) -> DevicePackage:
        """Check the whole archive's sha256, unpack it atomically, verify it; -> the package."""
        assert self.meta is not None and self.complete
        digest = hashlib.sha256()
        with open(self.part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        if digest.hexdigest() != self.meta["archive_sha256"]:
            self.reset()
            raise IntegrityError("downloaded package: archive sha256 does not match; the download starts over")
        version = self.meta["version"]
        dest = package_dir(self.root, self.model_id, version)
        if dest.exists():  # already unpacked by an earlier download of the same version
            package = DevicePackage.load(dest)
        else:
            package = unpack_package(self.part, dest)
        self.reset()
        if (package.model_id, package.base_version) != (self.model_id, version):
            shutil.rmtree(dest, ignore_errors=True)
            raise IntegrityError(f"the package served as {self.model_id} {version} is "
                                 f"{package.model_id} {package.base_version}")
        return package


def backoff(attempt: int, initial: float = 0.2, maximum: float = 5.0) -> float:
    """Full jitter: random(0, min(initial * 2^attempt, maximum))."""
    return random.uniform(0, min(initial * 2**attempt, maximum))


def can_resume(err: BaseException) -> bool:
    """A broken stream or a bad chunk: resume from what was verified and written so far."""
    return isinstance(err, (CloudUnavailable, IntegrityError))

"""The device's last good bundle on disk, written so that a crash never leaves a torn file.

    store = BundleStore("state/bundles", package.model_id, package.base_version, decode=decode_bundle)
    bundle = store.load()            # None: nothing usable held (store.rejected says why, if anything)
    store.save(fetched.data)         # verifies, then replaces the file atomically

The file holds the DeltaBundle message exactly as it arrived (`Fetched.data`); its own checksum
covers the payload, so reading it back is the same verification as receiving it. The store keeps
bytes and is given the codec that reads them (`common.serde.decode_bundle`), so the store itself
loads no generated protobuf code. A write goes to
a temporary file in the same directory, is fsynced, and replaces the old file with os.replace
(atomic on POSIX and Windows), and the directory is fsynced so the rename itself is durable: after
a crash at any point the file is the old bundle or the new one, never a mix.

A bundle is refused, with the reason, when its checksum or structure fails, when it was made for
another model or base version (the device got a new package since), or when it has expired;
a refused file is moved aside to `<name>.rejected` for inspection, and the device serves the base
model until a good bundle arrives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from paramcast.common.bundle import DeltaBundle, check_bundle_for
from paramcast.common.errors import IntegrityError, VersionMismatch

log = logging.getLogger("paramcast.device")

MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # far above any real bundle; a guard against reading junk files

Decode = Callable[[bytes], DeltaBundle]  # serialized bundle -> verified bundle, IntegrityError otherwise


class ExpiredBundle(IntegrityError):
    """The bundle's expires_at_ms has passed; the protocol forbids applying it."""


def verify_bundle(data: bytes, model_id: str, base_version: str, decode: Decode,
                  now_ms: int | None = None) -> DeltaBundle:
    """Decode and check a serialized bundle for the model the device runs; raises IntegrityError
    (checksum or structure), VersionMismatch (other model or base version) or ExpiredBundle."""
    bundle = decode(data)
    check_bundle_for(bundle, model_id, base_version)
    if bundle.is_expired(now_ms):
        raise ExpiredBundle(f"bundle {bundle.bundle_id} expired at {bundle.expires_at_ms} ms since the epoch")
    return bundle


class BundleStore:
    def __init__(self, root: str | Path, model_id: str, base_version: str, decode: Decode):
        self.root = Path(root)
        self.model_id, self.base_version = model_id, base_version
        self.decode = decode
        self.path = self.root / f"{model_id}.bundle"
        self.rejected: str | None = None  # why the last load refused what it found

    def save(self, data: bytes) -> DeltaBundle:
        """Verify `data` and make it the last good bundle; on any error the old file is untouched."""
        bundle = verify_bundle(data, self.model_id, self.base_version, self.decode)
        write_atomic(self.path, data)
        return bundle

    def load(self) -> DeltaBundle | None:
        """The last good bundle, or None when there is none or what is there must not be used."""
        self.rejected = None
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            if size > MAX_BUNDLE_BYTES:
                raise IntegrityError(f"{size} bytes is not a bundle")
            return verify_bundle(self.path.read_bytes(), self.model_id, self.base_version, self.decode)
        except (IntegrityError, VersionMismatch) as exc:
            self.reject(str(exc))
            return None

    def reject(self, reason: str) -> None:
        """Move the held file aside (kept for inspection) and remember why."""
        self.rejected = reason
        log.warning("discarding the stored bundle %s: %s", self.path, reason)
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".rejected"))
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that after a crash it holds the old bytes or the new, never a mix:
    a temporary file in the same directory, fsynced, renamed over `path`, then the directory fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""The device's last good bundle on disk, written so that a crash never leaves a torn file.

    store = BundleStore("state/bundles", package.model_id, package.base_version, decode_bundle,
                        device_id="device-17")
    bundle = store.load()            # None: nothing usable held (store.rejected says why, if anything)
    store.save(fetched.data)         # verifies, then replaces the file atomically

The file holds the DeltaBundle message exactly as it arrived (`Fetched.data`); its own checksum
covers the payload, so reading it back is the same verification as receiving it. The store keeps
bytes and is given the codec that reads them (`common.serde.decode_bundle`), so the store itself
loads no generated protobuf code. A write goes to a temporary file in the same directory, is
fsynced, and replaces the old file with os.replace (atomic on POSIX and Windows), and the
directory is fsynced so the rename itself is durable: after a crash at any point the file is the
old bundle or the new one, never a mix.

A bundle is refused, with the reason, when its checksum or structure fails, when it was made for
another model or base version (the device got a new package since) or for another device (a copy
of another device's file), or when it has expired; a refused file is moved aside to
`<name>.rejected` for inspection, and the device serves the base model until a good bundle arrives.
Whatever else may sit at the bundle's path (a directory, a FIFO, a link, a huge file) is refused
the same way without being opened for more than a look (common/files.py), and temporaries left by
a writer that was killed are removed when a store opens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from paramcast.common.bundle import DeltaBundle, check_bundle_for
from paramcast.common.errors import IntegrityError, VersionMismatch
from paramcast.common.files import check_name, move_aside, read_regular, sweep_temporaries, temporary_path

log = logging.getLogger("paramcast.device")

MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # far above any real bundle; a guard against reading junk files

Decode = Callable[[bytes], DeltaBundle]  # serialized bundle -> verified bundle, IntegrityError otherwise


class ExpiredBundle(IntegrityError):
    """The bundle's expires_at_ms has passed; the protocol forbids applying it."""


def verify_bundle(data: bytes, model_id: str, base_version: str, decode: Decode, now_ms: int | None = None,
                  device_id: str | None = None) -> DeltaBundle:
    """Decode and check a serialized bundle for the model the device runs (and, given `device_id`,
    for this device); raises IntegrityError (checksum or structure), VersionMismatch (other model or
    base version), DeviceMismatch (another device's bundle) or ExpiredBundle."""
    bundle = decode(data)
    check_bundle_for(bundle, model_id, base_version, device_id)
    if bundle.is_expired(now_ms):
        raise ExpiredBundle(f"bundle {bundle.bundle_id} expired at {bundle.expires_at_ms} ms since the epoch")
    return bundle


class BundleStore:
    """The last good bundle of `model_id` under `root`; `device_id` (the device's own id) makes it
    refuse bundles generated for any other device."""

    def __init__(self, root: str | Path, model_id: str, base_version: str, decode: Decode,
                 device_id: str | None = None):
        self.root = Path(root)
        self.model_id, self.base_version, self.device_id = check_name("model_id", model_id), base_version, device_id
        self.decode = decode
        self.path = self.root / f"{model_id}.bundle"
        self.rejected: str | None = None  # why the last load refused what it found
        sweep_temporaries(self.root)

    def save(self, data: bytes) -> DeltaBundle:
        """Verify `data` and make it the last good bundle; on any error the old file is untouched."""
        bundle = verify_bundle(data, self.model_id, self.base_version, self.decode, device_id=self.device_id)
        write_atomic(self.path, data)
        return bundle

    def load(self) -> DeltaBundle | None:
        """The last good bundle, or None when there is none or what is there must not be used."""
        self.rejected = None
        try:
            data = read_regular(self.path, MAX_BUNDLE_BYTES)
            return verify_bundle(data, self.model_id, self.base_version, self.decode, device_id=self.device_id)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (IntegrityError, VersionMismatch) as exc:
            self.reject(str(exc))
        except OSError as exc:  # unreadable (permissions, I/O error): refuse it like a damaged file
            self.reject(f"cannot be read ({exc})")
        return None

    def reject(self, reason: str) -> None:
        """Move the held file aside (kept for inspection) and remember why."""
        self.rejected = reason
        log.warning("discarding the stored bundle %s: %s", self.path, reason)
        move_aside(self.path)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that after a crash it holds the old bytes or the new, never a mix:
    a temporary file in the same directory, fsynced, renamed over `path`, then the directory fsynced.
    A directory found at `path` is moved aside to `<path>.rejected` first (a rename cannot replace it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            log.warning("%s is a directory; moving it aside to write the file", path)
            move_aside(path)
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

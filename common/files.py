"""Files read from and written to a device's disk, handled so that nothing found there can hang,
crash or escape its directory: the device's state (device/agent.py, device/store.py, the download
in device/client.py) and the package reader (common/package.py) go through these helpers.

A device's state is written only by ParamCast, but what is on disk after a crash,
a full disk, a botched restore or a hostile local user can be anything: a directory or a FIFO where
a file belongs, a link, a file far larger than any real one, the temporary of a writer that was
killed. The helpers:

- `check_name` / `is_plain_name`: ids that become file names (model ids, versions) are plain names,
  never paths (`../../x` cannot name a file outside the state directory).
- `read_regular`: the bytes of a regular file, opened without following a link and without
  blocking (a FIFO would block a plain `open()` until a writer appears); anything else, or a file
  above the caller's size bound, is an IntegrityError naming the path and what was found.
- `temporary_path` / `sweep_temporaries`: writers put their bytes in `<name>.<pid>.<token>.tmp`
  beside the target; a temporary whose writer no longer runs (or that is older than any write
  takes) is debris from a crash and is removed.
- `move_aside` / `remove`: whatever is at a path, of any type, is moved out of the way or deleted.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from paramcast.common.errors import IntegrityError, InvalidInput

log = logging.getLogger("paramcast.device")

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# `<name>.<pid>.tmp` or `<name>.<pid>.<token>.tmp` (files from write_atomic, directories from unpacking).
_TEMPORARY = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)?\.tmp$")
# A write takes milliseconds; a temporary this old belongs to nobody, whatever its pid says
# (after a reboot pids are reused).
STALE_TEMPORARY_S = 60.0


def is_plain_name(value: object) -> bool:
    """True for a name that is safe as one path component: letters, digits, `.`, `_`, `-`, no leading dot."""
    return isinstance(value, str) and PLAIN_NAME.match(value) is not None


def check_name(field: str, value: str) -> str:
    """`value`, or InvalidInput naming `field` when it could not safely name a file."""
    if not is_plain_name(value):
        raise InvalidInput(field, f"{str(value)[:80]!r} cannot name a file: use letters, digits, '.', '_' and '-' "
                                  "(at most 128, not starting with '.')")
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path` (at most `max_bytes`).

    Raises FileNotFoundError when nothing is there, and IntegrityError when what is there is not a
    regular file (a link is not followed, a FIFO is not waited on) or holds more than `max_bytes`.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP for a link under O_NOFOLLOW, ENXIO for a socket, EACCES, ...
        try:
            kind = _kind(os.lstat(path).st_mode)
        except OSError:
            kind = "unreadable"
        raise IntegrityError(f"{path}: cannot be read as a file: {kind} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{path}: is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise IntegrityError(f"{path}: {info.st_size} bytes, more than the {max_bytes} bytes a file here may hold")
        chunks, held = [], 0
        while block := os.read(fd, min(1 << 20, max_bytes + 1 - held)):  # +1: notice a file growing past the bound
            chunks.append(block)
            held += len(block)
            if held > max_bytes:
                raise IntegrityError(f"{path}: more than the {max_bytes} bytes a file here may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)


def temporary_path(path: str | Path) -> Path:
    """Where a writer of `path` puts its bytes before renaming them over `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove(path: str | Path) -> None:
    """Delete whatever is at `path` (file, link, FIFO or directory tree); nothing there is fine."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_aside(path: str | Path, suffix: str = ".rejected") -> Path | None:
    """Rename whatever is at `path` to `<path><suffix>` (replacing an older one, of any type), for
    inspection; deletes it when even that fails. -> the new path, or None when nothing was there."""
    path = Path(path)
    target = path.with_name(path.name + suffix)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    try:
        remove(target)
        os.replace(path, target)
        return target
    except OSError as exc:
        log.warning("could not move %s aside (%s); deleting it", path, exc)
        remove(path)
        return None


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it now
    if os.name != "posix":
        return True  # no cheap check: rely on the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def sweep_temporaries(folder: str | Path, now: float | None = None) -> list[str]:
    """Remove the temporaries in `folder` whose writer is gone (or that are older than any write
    takes); -> the names removed. A missing folder has none."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # its writer just renamed it into place
        if _writer_alive(int(match["pid"])) and age < STALE_TEMPORARY_S:
            continue
        try:
            remove(entry.path)
        except OSError as exc:
            log.warning("could not remove the stale temporary %s: %s", entry.path, exc)
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d temporaries left by interrupted writes in %s: %s", len(removed), folder,
                 ", ".join(sorted(removed)))
    return removed

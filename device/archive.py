"""The device package as one archive: what `ParamService.GetModel` streams.

A device package is a directory (`manifest.json` + the files it lists, see `device/package.py`).
On the wire it travels as a single uncompressed POSIX ustar archive:

- members are regular files only, each at the top level (no directories, links or paths), the
  manifest first and then the files it lists in name order;
- every header is normalised (mtime 0, mode 0644, uid/gid 0, no user or group names), so the same
  package always gives the same bytes and the same archive sha256 on every server, which is what
  lets a device resume a download from another replica or after a restart;
- no compression: the bulk is float weights, which gzip barely shrinks, and an uncompressed archive
  can be checked chunk by chunk as it arrives.

tar rather than zip because ustar is a fixed 512-byte-header stream that a device in any language
can write to disk as it arrives and unpack in one forward pass, and every platform ships a reader.

Unpacking is defensive: bytes from the network are checked member by member (type, name, size)
before any of a member's bytes are written -- the manifest must come first, and every later member
must be a file the manifest lists, of exactly the size it declares -- and the result is verified
with `DevicePackage.load` (the manifest's digest, the sha256 of every file) before it is used.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from paramcast.common.errors import IntegrityError
from paramcast.device.files import is_plain_name
from paramcast.device.package import MANIFEST_FILE, MAX_MANIFEST_BYTES, DevicePackage

MAX_MEMBERS = 64
MAX_ARCHIVE_BYTES = 2**30  # the default ceiling a device accepts; real packages are megabytes


def package_files(package_dir: str | Path) -> list[str]:
    """Names of the files that belong in the archive of the package at `package_dir`, in order."""
    package_dir = Path(package_dir)
    manifest = json.loads((package_dir / MANIFEST_FILE).read_bytes())
    listed = sorted(manifest["files"])
    return [MANIFEST_FILE, *[name for name in listed if name != MANIFEST_FILE]]


def pack_package(package_dir: str | Path) -> bytes:
    """The canonical archive bytes of a package directory (verified with DevicePackage.load first)."""
    package = DevicePackage.load(package_dir)  # never ship a package that would fail on the device
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in package_files(package.path):
            data = (package.path / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_package(archive: str | Path, dest: str | Path, max_bytes: int = MAX_ARCHIVE_BYTES) -> DevicePackage:
    """Unpack an archive file (at most `max_bytes`) into the new directory `dest` (atomically) and
    return the verified package.

    Raises IntegrityError when the archive is malformed or too large, holds anything but plain
    top-level files, holds a file the manifest does not list or of another size than it declares,
    or the unpacked package fails verification; `dest` is then left untouched.
    """
    dest = Path(dest)
    if os.path.lexists(dest):
        raise IntegrityError(f"{dest}: already exists; unpack into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Named like every device temporary (device/files.py), so an unpack killed mid-way is swept.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        _extract(Path(archive), tmp, max_bytes)
        DevicePackage.load(tmp)  # sha256 of every listed file, before anything else sees it
        os.replace(tmp, dest)  # same filesystem: the package appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DevicePackage.load(dest)


def _declared_sizes(manifest: bytes, archive: Path) -> dict[str, int]:
    """name -> size in bytes of every file the manifest lists (checked in full after unpacking)."""
    try:
        files = json.loads(manifest)["files"]
        sizes = {str(name): entry["bytes"] for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{archive}: its {MANIFEST_FILE} has no readable file list ({exc!r})") from None
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise IntegrityError(f"{archive}: {MANIFEST_FILE} declares {size!r} bytes for {name[:80]!r}")
    return sizes


def _extract(archive: Path, out: Path, max_bytes: int) -> None:
    size = archive.stat().st_size
    if size > max_bytes:
        raise IntegrityError(f"{archive}: {size} bytes, larger than the {max_bytes} this device accepts")
    seen: set[str] = set()
    declared: dict[str, int] | None = None  # from the manifest, the first member
    try:
        with tarfile.open(archive, mode="r:") as tar:  # "r:" = uncompressed only, as the format says
            for member in tar:
                if len(seen) >= MAX_MEMBERS:
                    raise IntegrityError(f"{archive}: more than {MAX_MEMBERS} members")
                if not member.isreg():
                    raise IntegrityError(f"{archive}: member {member.name[:80]!r} is not a regular file")
                if not is_plain_name(member.name):
                    raise IntegrityError(f"{archive}: member name {member.name[:80]!r} is not a plain file name")
                if member.name in seen:
                    raise IntegrityError(f"{archive}: member {member.name!r} appears twice")
                first = declared is None
                if first and member.name != MANIFEST_FILE:
                    raise IntegrityError(f"{archive}: the first member is {member.name[:80]!r}, not {MANIFEST_FILE}")
                if declared is not None and member.name not in declared:
                    raise IntegrityError(f"{archive}: member {member.name!r} is not listed in the manifest")
                if first and member.size > MAX_MANIFEST_BYTES:
                    raise IntegrityError(f"{archive}: {MANIFEST_FILE} holds {member.size} bytes, more than "
                                         f"{MAX_MANIFEST_BYTES}")
                if declared is not None and member.size != declared[member.name]:
                    raise IntegrityError(f"{archive}: member {member.name!r} holds {member.size} bytes; the "
                                         f"manifest declares {declared[member.name]}")
                seen.add(member.name)
                src = tar.extractfile(member)
                assert src is not None  # regular files always have a payload
                with open(out / member.name, "wb") as f:
                    shutil.copyfileobj(src, f)
                    f.flush()
                    os.fsync(f.fileno())
                if first:
                    declared = _declared_sizes((out / MANIFEST_FILE).read_bytes(), archive)
    except tarfile.TarError as exc:
        raise IntegrityError(f"{archive}: not a valid package archive ({exc})") from None
    if declared is None:
        raise IntegrityError(f"{archive}: no {MANIFEST_FILE} in the archive")

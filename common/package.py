"""The device package format, the one definition the cloud (which writes packages) and the device
(which reads them) share: the manifest and its constants, the verified reader, and the archive a
package travels in.

A package is a directory: `manifest.json` and the files it lists (`model.onnx`, the item
vocabulary `items.json`, the request policy `policy.json` and its fitted state), written by
`cloud/export.py`. Loading checks the manifest's own digest (`manifest_sha256`, so an edit to any
value in it is noticed), then the manifest against its JSON Schema (`manifest.schema.json`, shipped
beside this module) and every value the runtime relies on, then the size and sha256 of every file
it lists, and keeps the verified bytes so the session is built from exactly what was checked; the
device runtime then checks the manifest against the graph itself (device/runtime.py). This module
needs numpy and the standard library only; reading the graph's weights also needs `onnx`.

On the wire (`ParamService.GetModel`) a package travels as a single uncompressed POSIX ustar
archive:

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

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from paramcast.common.errors import IntegrityError, ModelNotFound
from paramcast.common.files import is_plain_name, read_regular
from paramcast.common.schema import SchemaError, validate

FORMAT = "paramcast.device-package"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
VOCABULARY_FILE = "items.json"
POLICY_FILE = "policy.json"  # the request policy the device loop runs (device/loop.py)
MAPPER_FILE = "policy_mapper.npz"  # the ideal gate's fitted mapper


class ItemVocabulary:
    """Catalogue item ids (the strings the device's catalogue and the source data use) <-> model
    item ids (1..n_items; 0 is padding). Stored in the package as a JSON array of n_items + 1
    strings: entry i is the catalogue id of model item i, entry 0 the empty string."""

    def __init__(self, catalogue_ids: list[str]):
        if not catalogue_ids or catalogue_ids[0] != "":
            raise IntegrityError("item vocabulary: entry 0 (padding) must be the empty string")
        self.catalogue_ids = catalogue_ids
        self.index = {c: i for i, c in enumerate(catalogue_ids) if i}
        if len(self.index) != len(catalogue_ids) - 1 or "" in self.index:
            raise IntegrityError("item vocabulary: catalogue ids must be unique and non-empty")

    @classmethod
    def from_json(cls, data: bytes, where: str = VOCABULARY_FILE) -> ItemVocabulary:
        try:
            ids = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise IntegrityError(f"{where}: expected a JSON array of strings")
        return cls(ids)

    def to_json(self) -> bytes:
        return (json.dumps(self.catalogue_ids, separators=(",", ":")) + "\n").encode()

    def __len__(self) -> int:
        return len(self.catalogue_ids) - 1  # n_items

    def model_ids(self, catalogue_ids) -> np.ndarray:
        """Catalogue ids -> (n,) int64 model ids; ids the model does not know (items newer than its
        training) are left out, as the model has no embedding for them."""
        known = [self.index[c] for c in (str(c) for c in catalogue_ids) if c in self.index]
        return np.asarray(known, dtype=np.int64)

    def catalogue(self, model_ids) -> list[str]:
        """Model ids -> their catalogue ids (0, padding, gives "")."""
        return [self.catalogue_ids[int(i)] for i in model_ids]


MANIFEST_DIGEST_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 1024 * 1024  # real manifests are a few KiB


def manifest_digest(manifest: dict) -> str:
    """The hex sha256 a manifest records of itself: over its canonical JSON without the
    `manifest_sha256` entry (keys sorted, no whitespace, ASCII escapes: Python's
    `json.dumps(m, sort_keys=True, separators=(",", ":"))`)."""
    body = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class SlotSpec:
    """An adapter slot: delta W = A (d_in, r) @ B (r, d_out) with r <= max_rank, fed as graph inputs
    `a_input` and `b_input`."""

    name: str
    d_in: int
    d_out: int
    max_rank: int
    a_input: str
    b_input: str


@dataclass(frozen=True)
class AxisSlice:
    """Keep only a unit group's kept indices of tensor `name` along `axis`."""

    name: str
    axis: int


@dataclass(frozen=True)
class UnitGroup:
    """Units that slimming can drop: the weights to slice, and the factor inputs whose width follows."""

    name: str
    n_units: int
    initializers: tuple[AxisSlice, ...]
    adapter_inputs: tuple[AxisSlice, ...]  # axes in the graph-input layout (B|1, d_in, r) / (B|1, r, d_out)


@dataclass(frozen=True)
class DevicePackage:
    path: Path
    manifest: dict
    model_bytes: bytes
    files: dict[str, bytes]  # every file the manifest lists, verified

    @classmethod
    def load(cls, path: str | Path) -> DevicePackage:
        """Read and verify the package in directory `path`.

        Raises ModelNotFound when there is no package there and IntegrityError, naming the file,
        when the manifest is malformed or a file is missing or does not match its sha256.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        try:
            raw = read_regular(manifest_path, MAX_MANIFEST_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(f"no device package at {path} (expected {manifest_path}); create one with "
                                "`paramcast export`") from None
        except OSError as exc:
            raise IntegrityError(f"{manifest_path}: cannot be read ({exc})") from None
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{manifest_path}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IntegrityError(f"{manifest_path}: not a ParamCast device package manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IntegrityError(
                f"{manifest_path}: format version {manifest.get('format_version')!r}, this runtime reads "
                f"{FORMAT_VERSION}"
            )
        recorded = manifest.get(MANIFEST_DIGEST_KEY)
        if not isinstance(recorded, str):
            raise IntegrityError(f"{manifest_path}: no {MANIFEST_DIGEST_KEY}; export the package again with "
                                 "`paramcast export`")
        if recorded != manifest_digest(manifest):
            raise IntegrityError(f"{manifest_path}: {MANIFEST_DIGEST_KEY} does not match its contents (the "
                                 "manifest was changed after export)")
        try:
            validate(manifest)  # manifest.schema.json: every field's type and range
        except SchemaError as exc:
            raise IntegrityError(f"{manifest_path}: {exc}") from None
        files = manifest.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise IntegrityError(f"{manifest_path}: the file list does not name {MODEL_FILE}")
        for key in ("vocabulary", "policy"):
            for name in (v for k, v in manifest.get(key, {}).items() if k in ("file", "mapper")):
                if name not in files:
                    raise IntegrityError(f"{manifest_path}: {key} names {name!r}, which the file list does not")
        contents = {}
        for name, entry in files.items():
            # Names come from the manifest: refuse anything that would read outside the package.
            if not is_plain_name(name) or name == MANIFEST_FILE:
                raise IntegrityError(f"{manifest_path}: file name {str(name)[:80]!r} is not a plain file name")
            if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0:
                raise IntegrityError(f"{manifest_path}: files[{name!r}] needs its size in bytes")
            file = path / name
            try:
                data = read_regular(file, entry["bytes"])  # never more than the manifest declares
            except FileNotFoundError:
                raise IntegrityError(f"{file}: listed in the manifest but missing") from None
            except OSError as exc:
                raise IntegrityError(f"{file}: cannot be read ({exc})") from None
            if len(data) != entry["bytes"]:
                raise IntegrityError(f"{file}: {len(data)} bytes, the manifest says {entry['bytes']}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.get("sha256"):
                raise IntegrityError(f"{file}: sha256 {digest} does not match the manifest")
            contents[name] = data
        package = cls(path, manifest, contents[MODEL_FILE], contents)
        try:
            # Parse everything once here so a malformed manifest fails at load, not mid-request.
            _ = (package.slots, package.unit_groups, package.max_len, package.n_items, package.hidden)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{manifest_path}: malformed manifest ({exc!r})") from None
        package._check_values(manifest_path)
        vocabulary = package.vocabulary
        if vocabulary is not None and len(vocabulary) != package.n_items:
            raise IntegrityError(f"{path / manifest['vocabulary']['file']}: {len(vocabulary)} items, "
                                 f"the model has {package.n_items}")
        return package

    def _check_values(self, manifest_path: Path) -> None:
        """The numbers the runtime sizes arrays by: positive, and ranks no larger than the slot allows."""
        for field in ("max_len", "n_items", "hidden"):
            if not _positive_int(self.manifest[field]):
                raise IntegrityError(f"{manifest_path}: {field} must be a positive integer, got "
                                     f"{self.manifest[field]!r}")
        for name, slot in self.slots.items():
            raw = self.manifest["slots"][name]
            for field in ("d_in", "d_out", "max_rank"):
                if not _positive_int(raw[field]):
                    raise IntegrityError(f"{manifest_path}: slots[{name!r}].{field} must be a positive integer, "
                                         f"got {raw[field]!r}")
            if slot.max_rank > min(slot.d_in, slot.d_out):
                raise IntegrityError(f"{manifest_path}: slots[{name!r}].max_rank {slot.max_rank} exceeds "
                                     f"min(d_in, d_out) = {min(slot.d_in, slot.d_out)}")
        for name in self.unit_groups:
            if not _positive_int(self.manifest["unit_groups"][name]["n_units"]):
                raise IntegrityError(f"{manifest_path}: unit_groups[{name!r}].n_units must be a positive integer")

    # -- what the manifest says --------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return str(self.manifest["model_id"])

    @property
    def base_version(self) -> str:
        return str(self.manifest["base_version"])

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def hidden(self) -> int:
        return int(self.manifest["hidden"])

    @cached_property
    def slots(self) -> dict[str, SlotSpec]:
        return {
            name: SlotSpec(name, int(s["d_in"]), int(s["d_out"]), int(s["max_rank"]), s["inputs"]["A"],
                           s["inputs"]["B"])
            for name, s in self.manifest["slots"].items()
        }

    @cached_property
    def unit_groups(self) -> dict[str, UnitGroup]:
        return {
            name: UnitGroup(
                name,
                int(g["n_units"]),
                tuple(AxisSlice(i["name"], int(i["axis"])) for i in g["initializers"]),
                tuple(AxisSlice(i["name"], int(i["axis"])) for i in g["adapter_inputs"]),
            )
            for name, g in self.manifest["unit_groups"].items()
        }

    @cached_property
    def vocabulary(self) -> ItemVocabulary | None:
        """The catalogue id <-> model id mapping, when the package carries one."""
        entry = self.manifest.get("vocabulary")
        if entry is None:
            return None
        return ItemVocabulary.from_json(self.files[entry["file"]], str(self.path / entry["file"]))

    # -- the graph's weights ----------------------------------------------------------------
    def graph(self) -> tuple[Any, dict[str, Any]]:
        """The ONNX graph (an onnx.ModelProto parsed from the verified bytes) and its initializers
        by name: the one reader of the graph's weights, for slimming and for the gates that need
        the item table. Needs the `onnx` package (in the device extra); scoring does not."""
        import onnx  # only editing or reading the graph's weights needs it, not ONNX Runtime scoring

        proto = onnx.load_from_string(self.model_bytes)
        return proto, {t.name: t for t in proto.graph.initializer}

    def weights(self, *names: str) -> dict[str, np.ndarray]:
        """Initializers of the graph, by name, as numpy arrays (IntegrityError naming a missing one)."""
        from onnx import numpy_helper

        _, tensors = self.graph()
        missing = [n for n in names if n not in tensors]
        if missing:
            raise IntegrityError(f"{self.path}: the graph has no initializer {missing[0]!r}")
        return {n: numpy_helper.to_array(tensors[n]) for n in names}

    def size_bytes(self) -> int:
        """Bytes on disk: the manifest and every file it lists."""
        listed = sum(int(f["bytes"]) for f in self.manifest["files"].values())
        return (self.path / MANIFEST_FILE).stat().st_size + listed


# ---------------------------------------------------------------------------------------------
# The archive a package travels in
# ---------------------------------------------------------------------------------------------

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
    # Named like every device temporary (common/files.py), so an unpack killed mid-way is swept.
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

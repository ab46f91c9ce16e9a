"""A device package on disk: `manifest.json` + the files it lists, verified before anything runs.

`cloud/export.py` writes the package; this module reads it with numpy and the standard library
only. Loading checks the manifest's own digest (`manifest_sha256`, so an edit to any value in it
is noticed), its format and every value the runtime relies on, then the size and sha256 of every
file it lists, and keeps the verified bytes so the session is built from exactly what was checked.
The runtime then checks the manifest against the graph itself (device/runtime.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from paramcast.common.errors import IntegrityError, ModelNotFound
from paramcast.device.files import is_plain_name, read_regular

FORMAT = "paramcast.device-package"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
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
        files = manifest.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise IntegrityError(f"{manifest_path}: the file list does not name {MODEL_FILE}")
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
        package = cls(path, manifest, contents[MODEL_FILE])
        try:
            # Parse everything once here so a malformed manifest fails at load, not mid-request.
            _ = (package.slots, package.unit_groups, package.max_len, package.n_items, package.hidden)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{manifest_path}: malformed manifest ({exc!r})") from None
        package._check_values(manifest_path)
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

    def size_bytes(self) -> int:
        """Bytes on disk: the manifest and every file it lists."""
        listed = sum(int(f["bytes"]) for f in self.manifest["files"].values())
        return (self.path / MANIFEST_FILE).stat().st_size + listed

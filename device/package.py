"""A device package on disk: `manifest.json` + the files it lists, verified before anything runs.

`cloud/export.py` writes the package; this module reads it with numpy and the standard library
only. Loading checks the format, then the sha256 of every file the manifest lists, and keeps the
verified bytes so the session is built from exactly what was checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from paramcast.common.errors import IntegrityError, ModelNotFound

FORMAT = "paramcast.device-package"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"


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
        if not manifest_path.is_file():
            raise ModelNotFound(f"no device package at {path} (expected {manifest_path}); create one with "
                                "`paramcast export`")
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{manifest_path}: not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IntegrityError(f"{manifest_path}: not a ParamCast device package manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IntegrityError(
                f"{manifest_path}: format version {manifest.get('format_version')!r}, this runtime reads "
                f"{FORMAT_VERSION}"
            )
        files = manifest.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise IntegrityError(f"{manifest_path}: the file list does not name {MODEL_FILE}")
        contents = {}
        for name, entry in files.items():
            file = path / name
            # Names come from the manifest: refuse anything that would read outside the package.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise IntegrityError(f"{manifest_path}: file name {name!r} points outside the package")
            if not file.is_file():
                raise IntegrityError(f"{file}: listed in the manifest but missing")
            data = file.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if not isinstance(entry, dict) or digest != entry.get("sha256"):
                raise IntegrityError(f"{file}: sha256 {digest} does not match the manifest")
            contents[name] = data
        package = cls(path, manifest, contents[MODEL_FILE])
        try:
            # Parse everything once here so a malformed manifest fails at load, not mid-request.
            _ = (package.slots, package.unit_groups, package.max_len, package.n_items, package.hidden)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{manifest_path}: malformed manifest ({exc!r})") from None
        return package

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

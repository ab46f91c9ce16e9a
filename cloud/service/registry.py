"""The models a server holds: several versions of each model id, side by side.

A version is a checkpoint's base version (the content hash of its device weights), so a device
holding version V always gets deltas from the generator trained for exactly V's weights. For each
version the registry keeps the generator (on the torch device it serves from: CPU or CUDA) and the device
package as one archive (`common/package.py`), ready for GetModel. The latest version of a model id
is the one added last: `paramcast serve --model old --model new` serves both, new as the latest.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.generator import Generator
from paramcast.common.errors import InvalidInput, ModelNotFound, VersionMismatch
from paramcast.common.package import DevicePackage, ItemVocabulary, pack_package

log = logging.getLogger("paramcast.service")


@dataclass(frozen=True)
class ServedModel:
    model_id: str
    version: str
    checkpoint: Checkpoint
    n_items: int  # valid item ids are 1..n_items
    window: int  # the generator reads the last `window` items of a request
    archive: bytes  # the device package, as GetModel streams it
    archive_sha256: bytes
    vocabulary: ItemVocabulary | None = None  # the package's catalogue id -> model id mapping

    @property
    def key(self) -> tuple[str, str]:
        return self.model_id, self.version


class ModelRegistry:
    def __init__(self, torch_device: str | torch.device = "cpu"):
        self.torch_device = torch.device(torch_device)
        self._models: dict[str, dict[str, ServedModel]] = {}  # model id -> version -> model, oldest first

    def add(self, ckpt: Checkpoint, package_dir: str | Path | None = None) -> ServedModel:
        """Serve `ckpt`; its device package is read from `package_dir` (checked to be this model's
        package) or, when None, exported now into a temporary directory."""
        if ckpt.generator is None:
            raise InvalidInput("model", f"model {ckpt.model_id} has no generator; train it with both stages")
        version = ckpt.base_version
        if version in self._models.get(ckpt.model_id, {}):
            raise InvalidInput("model", f"{ckpt.model_id} version {version} is already served")
        archive, vocabulary = _package_archive(ckpt, version, package_dir)
        generator = cast(Generator, ckpt.generator)  # Checkpoint types it as any nn.Module
        generator.to(self.torch_device).eval()
        ckpt.device_model.to(self.torch_device).eval()  # the generator reads the device model's state per window
        served = ServedModel(
            model_id=ckpt.model_id,
            version=version,
            checkpoint=ckpt,  # its base version is hashed once (Checkpoint.base_version caches it)
            n_items=ckpt.device_model.cfg.n_items,
            window=generator.cfg.window,
            archive=archive,
            archive_sha256=hashlib.sha256(archive).digest(),
            vocabulary=vocabulary,
        )
        self._models.setdefault(ckpt.model_id, {})[version] = served
        log.info("serving %s version %s (window %d, %d items, package %d bytes)", served.model_id, version,
                 served.window, served.n_items, len(archive))
        return served

    def __len__(self) -> int:
        return sum(len(v) for v in self._models.values())

    def models(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def versions(self, model_id: str) -> list[str]:
        return list(self._models.get(model_id, {}))

    def latest(self, model_id: str) -> ServedModel:
        versions = self._models.get(model_id)
        if not versions:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model_id: {model_id!r} is not served here (served: {served})")
        return next(reversed(versions.values()))

    def get(self, model_id: str, version: str) -> ServedModel:
        """A specific version, for GetModel: NOT_FOUND when absent."""
        latest = self.latest(model_id)
        if not version:
            return latest
        served = self._models[model_id].get(version)
        if served is None:
            raise ModelNotFound(
                f"version: {model_id} has no version {version!r} (served: {', '.join(self.versions(model_id))})"
            )
        return served

    def for_base(self, model_id: str, base_version: str) -> ServedModel:
        """The model a device holding `base_version` needs, for Generate: FAILED_PRECONDITION
        (VersionMismatch naming the latest) when that base is not served."""
        latest = self.latest(model_id)
        served = self._models[model_id].get(base_version)
        if served is None:
            raise VersionMismatch(
                f"base_version: {base_version!r} is not served for {model_id}; served versions are "
                f"{', '.join(self.versions(model_id))}, the latest is {latest.version} "
                "(fetch it with GetModel)",
                latest=latest.version,
            )
        return served


def _package_archive(ckpt: Checkpoint, version: str, package_dir: str | Path | None,
                     ) -> tuple[bytes, ItemVocabulary | None]:
    """The package's archive and its item vocabulary (which Generate uses for catalogue ids)."""
    if package_dir is not None:
        package = DevicePackage.load(package_dir)
        if (package.model_id, package.base_version) != (ckpt.model_id, version):
            raise InvalidInput(
                "package", f"{package_dir} is the package of {package.model_id} {package.base_version}, "
                           f"not of {ckpt.model_id} {version}; export it again with `paramcast export`"
            )
        return pack_package(package.path), package.vocabulary
    from paramcast.cloud.export import export_package  # onnx export is only needed when no package was given

    tmp = Path(tempfile.mkdtemp(prefix="paramcast-package-"))
    try:
        exported = DevicePackage.load(export_package(ckpt, tmp / "package"))
        return pack_package(exported.path), exported.vocabulary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

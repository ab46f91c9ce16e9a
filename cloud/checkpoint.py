"""Training checkpoints on disk: the versioned unit that training writes and export, serve and simulate read.

A checkpoint directory holds `checkpoint.pt` (weights and configs, loaded with `weights_only=True`)
and `checkpoint.json` (the same metadata, human-readable). Directories written before the files
had these names (`bundle.pt`) still load. The base version is content-addressed: the sha256 of the
device model's weights, so two servers holding the same weights agree on it and a device can never
confuse two trainings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.generator import Generator, GeneratorConfig
from paramcast.cloud.model import DeviceModel, DeviceModelConfig
from paramcast.common.errors import ModelNotFound

FORMAT_VERSION = 2  # 2: the cloud model, and a generator built on its encoder
CHECKPOINT_FILE = "checkpoint.pt"
INFO_FILE = "checkpoint.json"
_OLD_CHECKPOINT_FILE = "bundle.pt"  # the name earlier trainings wrote; same payload


def weights_version(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, shapes and bytes, in name order (first 16 hex digits)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    model_id: str
    device_model: DeviceModel
    generator: Generator | None = None
    meta: dict = field(default_factory=dict)  # data, split, training history, metrics
    cloud_model: CloudModel | None = None  # the teacher the generator distils; serves the `cloud` variant

    @functools.cached_property
    def base_version(self) -> str:
        """Hashed once: a checkpoint's device weights never change after training."""
        return weights_version(self.device_model)


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of a checkpoint directory (or `path` itself when it names a file)."""
    path = Path(path)
    if not path.is_dir():
        return path
    current = path / CHECKPOINT_FILE
    old = path / _OLD_CHECKPOINT_FILE
    return old if not current.exists() and old.exists() else current


def save_checkpoint(ckpt: Checkpoint, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = ckpt.generator
    payload = {
        "format": FORMAT_VERSION,
        "model_id": ckpt.model_id,
        "base_version": ckpt.base_version,
        "device_config": ckpt.device_model.cfg.to_dict(),
        "device_state": {k: v.detach().cpu() for k, v in ckpt.device_model.state_dict().items()},
        "generator_config": gen.cfg.to_dict() if gen is not None else None,
        "generator_state": {k: v.detach().cpu() for k, v in gen.state_dict().items()} if gen else None,
        "meta_json": json.dumps(ckpt.meta),
        "cloud_config": ckpt.cloud_model.cfg.to_dict() if ckpt.cloud_model is not None else None,
        "cloud_state": ({k: v.detach().cpu() for k, v in ckpt.cloud_model.state_dict().items()}
                        if ckpt.cloud_model is not None else None),
    }
    tmp = out / f"{CHECKPOINT_FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT_FILE)  # a crash mid-save leaves the previous checkpoint intact
    info = {k: payload[k] for k in ("format", "model_id", "base_version", "device_config", "generator_config",
                                    "cloud_config")}
    info["meta"] = ckpt.meta
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    file = checkpoint_file(path)
    if not file.exists():
        raise ModelNotFound(f"no checkpoint at {path} (expected {file}); train one with `paramcast train`")
    payload = torch.load(file, map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ModelNotFound(f"{file}: checkpoint format {payload.get('format')} is not {FORMAT_VERSION}")
    device_model = DeviceModel(DeviceModelConfig(**payload["device_config"]))
    device_model.load_state_dict(payload["device_state"])
    device_model.eval()
    generator = None
    if payload["generator_config"] is not None:
        # A generator saved before the cloud-expectation input existed was built without it (one
        # saved before refinement gets refine_steps' default, 0: the bundles it always made).
        generator = Generator(GeneratorConfig(**{"cloud_expectation": False, **payload["generator_config"]}))
        generator.load_state_dict(payload["generator_state"])
        generator.eval()
    cloud = None
    if payload["cloud_config"] is not None:
        cloud = CloudModel(CloudModelConfig(**payload["cloud_config"]))
        cloud.load_state_dict(payload["cloud_state"])
        cloud.eval()
    ckpt = Checkpoint(payload["model_id"], device_model, generator, json.loads(payload["meta_json"]), cloud)
    if ckpt.base_version != payload["base_version"]:
        raise ModelNotFound(f"{file}: weights do not match the recorded base version (corrupt file?)")
    return ckpt

"""Model bundles on disk: the versioned unit that training writes and export, serve and simulate read.

A bundle directory holds `bundle.pt` (weights and configs, loaded with `weights_only=True`) and
`bundle.json` (the same metadata, human-readable). The base version is content-addressed: the
sha256 of the device model's weights, so two servers holding the same weights agree on it and a
device can never confuse two trainings.
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
class ModelBundle:
    model_id: str
    device: DeviceModel
    generator: Generator | None = None
    meta: dict = field(default_factory=dict)  # data, split, training history, metrics
    cloud_model: CloudModel | None = None  # the teacher the generator distils; serves the `cloud` variant

    @functools.cached_property
    def base_version(self) -> str:
        """Hashed once: a bundle's device weights never change after training."""
        return weights_version(self.device)


def save_bundle(bundle: ModelBundle, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = bundle.generator
    payload = {
        "format": FORMAT_VERSION,
        "model_id": bundle.model_id,
        "base_version": bundle.base_version,
        "device_config": bundle.device.cfg.to_dict(),
        "device_state": {k: v.detach().cpu() for k, v in bundle.device.state_dict().items()},
        "generator_config": gen.cfg.to_dict() if gen is not None else None,
        "generator_state": {k: v.detach().cpu() for k, v in gen.state_dict().items()} if gen else None,
        "meta_json": json.dumps(bundle.meta),
        "cloud_config": bundle.cloud_model.cfg.to_dict() if bundle.cloud_model is not None else None,
        "cloud_state": ({k: v.detach().cpu() for k, v in bundle.cloud_model.state_dict().items()}
                        if bundle.cloud_model is not None else None),
    }
    tmp = out / "bundle.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, out / "bundle.pt")  # a crash mid-save leaves the previous bundle intact
    info = {k: payload[k] for k in ("format", "model_id", "base_version", "device_config", "generator_config",
                                    "cloud_config")}
    info["meta"] = bundle.meta
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    return out


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> ModelBundle:
    path = Path(path)
    file = path / "bundle.pt" if path.is_dir() else path
    if not file.exists():
        raise ModelNotFound(f"no model bundle at {path} (expected {file}); train one with `paramcast train`")
    payload = torch.load(file, map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ModelNotFound(f"{file}: bundle format {payload.get('format')} is not {FORMAT_VERSION}")
    device = DeviceModel(DeviceModelConfig(**payload["device_config"]))
    device.load_state_dict(payload["device_state"])
    device.eval()
    generator = None
    if payload["generator_config"] is not None:
        generator = Generator(GeneratorConfig(**payload["generator_config"]))
        generator.load_state_dict(payload["generator_state"])
        generator.eval()
    cloud = None
    if payload["cloud_config"] is not None:
        cloud = CloudModel(CloudModelConfig(**payload["cloud_config"]))
        cloud.load_state_dict(payload["cloud_state"])
        cloud.eval()
    bundle = ModelBundle(payload["model_id"], device, generator, json.loads(payload["meta_json"]), cloud)
    if bundle.base_version != payload["base_version"]:
        raise ModelNotFound(f"{file}: weights do not match the recorded base version (corrupt file?)")
    return bundle

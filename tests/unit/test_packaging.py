"""The installed layout, from a built wheel: one top-level name, `paramcast`, whose device side
imports and scores without torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from device_fixtures import tiny_package, torch_scores
from without_torch import LOADED, run_without_torch

REPO = Path(__file__).resolve().parents[2]
# What a wheel build needs of the checkout: pyproject.toml, README.md and the package folders.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "runs", "out", "*.egg-info", "__pycache__",
                                      ".*_cache", ".hypothesis", "benchmarks", "tests")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps --no-build-isolation`, built from a copy so the checkout gains no build/."""
    root = tmp_path_factory.mktemp("wheel")
    src = Path(shutil.copytree(REPO, root / "src", ignore=_NOT_SOURCES))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--quiet", "-w", str(root / "dist")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (root / "dist").glob("paramcast-*.whl")
    return built


def test_the_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names}
    (dist_info,) = [t for t in tops if t.endswith(".dist-info")]
    assert re.fullmatch(r"paramcast-[0-9][^-]*\.dist-info", dist_info)
    assert tops == {"paramcast", dist_info}
    for module in ("cli.py", "commands/serve.py", "simulation/harness.py", "common/bundle.py", "cloud/train.py",
                   "cloud/service/server.py", "device/runtime.py", "v1/param_service_pb2.py",
                   "v1/param_service.proto"):
        assert f"paramcast/{module}" in names, module
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^paramcast = paramcast\.cli:main$", entry_points, re.M)


def test_the_installed_device_side_scores_without_torch(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel installs by unpacking it
        zf.extractall(site)
    script = f"""
import json, sys
import paramcast, paramcast.device.agent, paramcast.device.policy
from paramcast.common.package import DevicePackage
from paramcast.device.runtime import DeviceRuntime

scores = DeviceRuntime(DevicePackage.load({str(tiny_package())!r})).score([1, 2, 3], [4, 5, 6])
print(json.dumps({{"from": paramcast.__file__, "scores": scores.tolist(), "loaded": {LOADED}}}))
"""
    proc = run_without_torch(tmp_path, ["-c", script], path=(site,))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["from"]).resolve().is_relative_to(site.resolve()), "imported the checkout, not the wheel"
    assert out["loaded"] == []
    np.testing.assert_allclose(out["scores"], torch_scores([([1, 2, 3], [4, 5, 6])])[0], atol=1e-4, rtol=0)

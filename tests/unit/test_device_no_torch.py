"""`device` works where torch is not installed: a subprocess whose `import torch` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from device_fixtures import random_bundle, tiny_package

from paramcast.common.serde import encode_bundle

REPO = Path(__file__).resolve().parents[2]

# Installed as sitecustomize.py ahead of everything else on sys.path, so it runs at interpreter
# start: any import of torch (or of cloud/, which needs torch) fails as if torch were absent.
BLOCKER = textwrap.dedent("""
    import importlib.abc
    import sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "cloud"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def _run_without_torch(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_torch_is_really_blocked(tmp_path):
    proc = _run_without_torch(tmp_path, ["-c", "import torch"])
    assert proc.returncode != 0 and "blocked for this test" in proc.stderr


def test_runtime_scores_and_applies_bundles_without_torch(tmp_path):
    bundle_file = tmp_path / "bundle.bin"
    bundle_file.write_bytes(encode_bundle(random_bundle(seed=1), "int8"))
    script = textwrap.dedent(f"""
        import json, sys
        from paramcast.common.serde import decode_bundle
        from paramcast.device.package import DevicePackage
        from paramcast.device.runtime import DeviceRuntime

        rt = DeviceRuntime(DevicePackage.load({str(tiny_package())!r}))
        base = rt.score([1, 2, 3], [4, 5, 6])
        rt.apply(decode_bundle(open({str(bundle_file)!r}, "rb").read()))
        adapted = rt.score([1, 2, 3], [4, 5, 6])
        slim = rt.slimmed({{"head": [True, False] * 16}}).score([[1, 2, 3]], [[4, 5, 6]])[0]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cloud"))
        print(json.dumps({{"base": base.tolist(), "adapted": adapted.tolist(), "slim": slim.tolist(),
                           "loaded": loaded}}))
    """)
    proc = _run_without_torch(tmp_path, ["-c", script])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    assert len(out["base"]) == 3 and np.isfinite(out["base"]).all()
    assert not np.allclose(out["adapted"], out["base"]) and not np.allclose(out["slim"], out["base"])


def test_device_score_command_without_torch(tmp_path):
    command = ["-m", "paramcast.cli", "device", "score", "--package", str(tiny_package()),
               "--history", "1,2,3", "--candidates", "4,5,6", "--json"]
    proc = _run_without_torch(tmp_path, command)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["scores"]) == 3

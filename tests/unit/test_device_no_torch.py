"""The device side works where torch is not installed: a subprocess whose `import torch` fails."""

from __future__ import annotations

import json

import numpy as np
from device_fixtures import random_bundle, tiny_package, torch_scores
from without_torch import LOADED, run_without_torch

from paramcast.common.serde import decode_bundle, encode_bundle

ATOL = 1e-4  # ONNX Runtime against PyTorch, float32
HISTORY, CANDIDATES = [1, 2, 3], [4, 5, 6]
HALF_HEAD = {"head": [True, False] * 16}


def test_torch_is_really_blocked(tmp_path):
    for module in ("torch", "paramcast.cloud.model"):
        proc = run_without_torch(tmp_path, ["-c", f"import {module}"])
        assert proc.returncode != 0 and "blocked for this test" in proc.stderr, module


def test_runtime_scores_and_applies_bundles_without_torch(tmp_path):
    data = encode_bundle(random_bundle(seed=1), "int8")
    (tmp_path / "bundle.bin").write_bytes(data)
    script = f"""
import json, sys
from paramcast.common.serde import decode_bundle
from paramcast.common.package import DevicePackage
from paramcast.device.runtime import DeviceRuntime

rt = DeviceRuntime(DevicePackage.load({str(tiny_package())!r}))
base = rt.score({HISTORY}, {CANDIDATES})
rt.apply(decode_bundle(open("bundle.bin", "rb").read()))
adapted = rt.score({HISTORY}, {CANDIDATES})
slim = rt.slimmed({HALF_HEAD}).score([{HISTORY}], [{CANDIDATES}])[0]
print(json.dumps({{"base": base.tolist(), "adapted": adapted.tolist(), "slim": slim.tolist(), "loaded": {LOADED}}}))
"""
    proc = run_without_torch(tmp_path, ["-c", script])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    user = [(HISTORY, CANDIDATES)]
    received = decode_bundle(data)  # the int8 factors exactly as the device decoded them
    np.testing.assert_allclose(out["base"], torch_scores(user)[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["adapted"], torch_scores(user, received.factors)[0], atol=ATOL, rtol=0)
    # A slimmed view of an adapted runtime starts from its own base model.
    np.testing.assert_allclose(out["slim"], torch_scores(user, keep=HALF_HEAD)[0], atol=ATOL, rtol=0)
    assert not np.allclose(out["adapted"], out["base"], atol=1e-3)  # the bundle really moved the scores


def test_device_score_command_without_torch(tmp_path):
    sent = random_bundle(seed=3)
    (tmp_path / "bundle.bin").write_bytes(encode_bundle(sent, "fp32"))
    command = ["-m", "paramcast.cli", "device", "score", "--package", str(tiny_package()), "--history", "1,2,3",
               "--candidates", "4,5,6", "--json"]
    for bundle in (None, sent):
        proc = run_without_torch(tmp_path, command + (["--bundle", "bundle.bin"] if bundle else []))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["candidates"] == CANDIDATES
        assert out["bundle_id"] == (bundle.bundle_id if bundle else None)
        expected = torch_scores([(HISTORY, CANDIDATES)], bundle.factors if bundle else None)[0]
        np.testing.assert_allclose(out["scores"], expected, atol=ATOL, rtol=0)

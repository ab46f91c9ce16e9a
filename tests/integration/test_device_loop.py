"""The device loop against a real server: observe, decide, request, verify, store, apply; and
`paramcast device run` with torch blocked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from paramcast.cloud.bundles import generate_bundles
from paramcast.cloud.checkpoint import load_checkpoint
from paramcast.cloud.export import export_package
from paramcast.cloud.service.server import ServerThread, load_models
from paramcast.common.data import load_interactions
from paramcast.common.errors import InvalidInput
from paramcast.common.package import DevicePackage
from paramcast.device.agent import APPLIED, UNREACHABLE, DeviceAgent
from paramcast.device.client import ParamClient
from paramcast.device.loop import DeviceLoop
from paramcast.device.runtime import DeviceRuntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from without_torch import run_without_torch  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(trained_model):
    return load_checkpoint(trained_model)


@pytest.fixture(scope="module")
def server(trained_model):
    with ServerThread(load_models([trained_model])) as st:
        yield st


@pytest.fixture(scope="module")
def user(shared_data):
    log = load_interactions(shared_data / "ml-100k")
    return log.sequences[int(np.argsort(log.lengths())[len(log.lengths()) // 2])][:30].astype(np.int64)


def test_the_loop_requests_when_its_policy_says_and_applies_verified_bundles(tmp_path, server, model, trained_model,
                                                                            user):
    package = DevicePackage.load(trained_model / "package")
    agent = DeviceAgent(tmp_path, model.model_id, device_id="d").open_package(package)
    with ParamClient(f"127.0.0.1:{server.port}", device_id="d", timeout_s=10) as client:
        loop = DeviceLoop.from_package(agent, client, spec="every-k:k=4,phase=0")
        requested = []
        for item in user:
            candidates = np.concatenate([[item], np.arange(1, 51)])
            loop.recommend(candidates)
            step = loop.observe(int(item))
            requested.append(step.requested)
            if step.requested:
                assert step.refresh.outcome == APPLIED
        # Never held a bundle: the first step asks; then every 4th.
        assert requested[0] and sum(requested) == 1 + (len(user) - 1) // 4
        assert loop.requests == loop.applied == sum(requested) and loop.response_bytes > 0
        # What it serves is the bundle for the window it asked with.
        last = max(i for i, r in enumerate(requested) if r)
        window = user[:last + 1]
        reference = DeviceRuntime(package)
        reference.apply(generate_bundles(model, [window[-model.generator.cfg.window:]])[0].quantized("int8"))
        cands = np.arange(1, 101)
        np.testing.assert_allclose(loop.recommend(cands), reference.score(loop.window, cands), atol=1e-5)
        assert (tmp_path / "bundles" / f"{model.model_id}.bundle").is_file()  # stored for restarts
    held = agent.bundle
    # Offline: the policy asks, the server is gone, the device keeps its last good bundle.
    with ParamClient("127.0.0.1:1", device_id="d", timeout_s=0.5) as offline:
        loop.client = offline
        loop.policy = DeviceLoop.from_package(agent, offline, spec="always").policy
        loop.policy.start(1)
        step = loop.observe(int(user[0]))
        assert step.requested and step.refresh.outcome == UNREACHABLE
        assert agent.bundle is held and agent.serving == "bundle"


def test_the_policy_ships_in_the_package(tmp_path, model):
    package = DevicePackage.load(export_package(model, tmp_path / "pkg", policy="drift:threshold=0.05"))
    assert package.manifest["policy"] == {"file": "policy.json"}
    shipped = json.loads(package.files["policy.json"])
    assert shipped["spec"] == "drift:threshold=0.05" and shipped["window"] == model.generator.cfg.window
    agent = DeviceAgent(tmp_path / "state", model.model_id, device_id="d").open_package(package)
    policy = DeviceLoop.from_package(agent).policy
    assert policy.name == "drift" and policy.threshold == 0.05
    bare = DeviceAgent(tmp_path / "s2", model.model_id, device_id="d").open_package(
        DevicePackage.load(export_package(model, tmp_path / "bare")))
    with pytest.raises(InvalidInput, match="ships no policy"):
        DeviceLoop.from_package(bare)


def test_device_run_replays_a_user_without_torch(tmp_path, server, trained_model, user):
    (tmp_path / "history.txt").write_text("\n".join(str(i) for i in user))
    command = ["-m", "paramcast.cli", "device", "run", "--package", str(trained_model / "package"),
               "--server", f"127.0.0.1:{server.port}", "--history", "history.txt", "--policy", "every-k:k=5,phase=0",
               "--json"]
    proc = run_without_torch(tmp_path, command)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == len(user) - 1
    assert summary["requests"] == summary["applied"] == 1 + (len(user) - 1) // 5
    assert summary["response_bytes"] > 0 and 0.0 <= summary["ndcg@10"] <= summary["hr@10"] <= 1.0
    assert "step 29/29" in proc.stderr  # the progress line


def test_simulate_and_export_ship_the_calibrated_policy_a_device_runs(tmp_path, trained_model, shared_data, capsys):
    from paramcast.cli import main
    from paramcast.device.ideal import GaussianMapper, IdealGate
    from paramcast.device.loop import load_policy

    # simulate calibrates the gate to a rate on validation devices and ships it, mapper included.
    code = main(["simulate", "--model", str(trained_model), "--data", str(shared_data / "ml-100k"), "--policy",
                 "never", "ideal:rate=0.2", "--users", "12", "--max-steps", "15", "--no-progress", "--json",
                 "--out", str(tmp_path), "--package-out", str(tmp_path / "pkg"), "--ship", "ideal:rate=0.2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    row = next(r for r in report["policies"] if r["name"] == "ideal:rate=0.2")
    shipped = DevicePackage.load(tmp_path / "pkg")
    assert shipped.manifest["policy"] == {"file": "policy.json", "mapper": "policy_mapper.npz"}
    policy = load_policy(shipped)
    assert isinstance(policy, IdealGate) and policy.target_rate == 0.2
    assert policy.threshold == row["validation"]["threshold"]  # calibrated here, not on the device
    mapper_file = tmp_path / "ideal-mapper-ml-100k.npz"
    assert np.array_equal(policy.mapper.w_mean, GaussianMapper.load(mapper_file).w_mean)

    # export ships a policy given with its threshold, and the mapper simulate wrote.
    assert main(["export", "--model", str(trained_model), "--out", str(tmp_path / "pkg2"),
                 "--policy", "ideal:threshold=0.02", "--mapper", str(mapper_file)]) == 0
    policy = load_policy(DevicePackage.load(tmp_path / "pkg2"))
    assert isinstance(policy, IdealGate) and policy.threshold == 0.02

    # What a device would refuse is refused before anything is written.
    for args, fragment in ((["--policy", "drift:rate=0.1"], "needs threshold"),
                           (["--policy", "ideal:threshold=0.1"], "fitted mapper"),
                           (["--mapper", str(mapper_file)], "ships with a policy")):
        assert main(["export", "--model", str(trained_model), "--out", str(tmp_path / "bad"), *args]) == 2
        assert fragment in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()

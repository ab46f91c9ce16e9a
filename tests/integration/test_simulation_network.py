"""Network mode of the simulation: every device a gRPC client of a real `paramcast serve` process,
scoring as a device agent on ONNX Runtime or batched in torch."""

from __future__ import annotations

import pytest

from paramcast.cloud.checkpoint import load_checkpoint
from paramcast.common.data import load_interactions
from paramcast.simulation.harness import SimulationConfig, run_simulation


@pytest.fixture(scope="module")
def data(shared_data):
    return load_interactions(shared_data / "ml-100k")


GATES = ["drift:rate=0.2", "window:rate=0.2", "loss:rate=0.2", "ideal:rate=0.2", "window:rate=0.2,pace=1.5"]


def test_device_agents_make_the_requests_of_the_inprocess_replay_under_every_gate(trained_model, data):
    """Real users replayed as device agents (ONNX Runtime, policy, store, client) against a real
    server: for the seed, the same requests and the same quality as the in-process torch replay."""
    ckpt = load_checkpoint(trained_model)
    cfg = SimulationConfig(policies=["never", "always", "random-p:0.2", "every-k:5", *GATES], users=10,
                           max_steps=15, progress=False)
    local = run_simulation(ckpt, data, cfg, mode="inprocess").report
    remote = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(trained_model)).report
    net = remote["network"]
    assert net["device_scoring"] == "agents" and net["devices"] == 10 and net["device_steps_per_s"] > 0
    steps = remote["devices"]["test_steps"]
    for a, b in zip(local["policies"], remote["policies"], strict=True):
        assert a["name"] == b["name"]
        assert b["request_rate"] == a["request_rate"], a["name"]
        assert b["requests_per_device"] == a["requests_per_device"], a["name"]
        here, there = local["over_time"][a["name"]], remote["over_time"][a["name"]]  # step by step
        assert there["request_rate"] == here["request_rate"], a["name"]
        assert there["ndcg@10"] == pytest.approx(here["ndcg@10"], abs=1e-4), a["name"]
        for m in ("ndcg@10", "hr@10", "auc"):
            assert b[m]["value"] == pytest.approx(a[m]["value"], abs=1e-4), (a["name"], m)
        # Every request went out from an agent, was verified and applied: enrolment, then each request.
        assert b["network"]["calls"] == 10 + round(b["request_rate"] * steps) and b["network"]["failures"] == 0
    requested = {p["name"]: p["request_rate"] for p in remote["policies"]}
    assert requested["never"] == 0.0 and requested["always"] == 1.0
    assert all(0.0 < requested[g] < 1.0 for g in GATES)  # each gate decided, calibrated on validation devices


def test_network_mode_measures_what_inprocess_mode_measures(trained_model, data):
    ckpt = load_checkpoint(trained_model)
    cfg = SimulationConfig(policies=["never", "always", "random-p:0.2", "drift:rate=0.2"], users=12, max_steps=15,
                           progress=False)
    local = run_simulation(ckpt, data, cfg, mode="inprocess").report
    remote = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(trained_model),
                            device_scoring="torch").report
    assert remote["mode"] == "network" and remote["network"]["started_server"]
    steps = remote["devices"]["test_steps"]
    devices = remote["devices"]["test"]
    assert devices == 12
    for a, b in zip(local["policies"], remote["policies"], strict=True):
        assert a["name"] == b["name"]
        # Same bundles (same generator, same int8 codec), so the same decisions and the same quality;
        # the server batches requests differently, which may move a float's last bit.
        assert b["request_rate"] == a["request_rate"]
        for m in ("ndcg@10", "hr@10", "auc"):
            assert b[m]["value"] == pytest.approx(a[m]["value"], abs=2e-3)
        net = b["network"]
        expected_calls = devices + round(b["request_rate"] * steps)  # enrolment, then every request
        assert net["calls"] == expected_calls and net["failures"] == 0
        # Bytes are what crossed the wire: each GenerateResponse wraps one encoded bundle.
        per_call = net["bytes_received"] / net["calls"]
        assert remote["bundle_bytes"] <= per_call <= remote["bundle_bytes"] + 16
        assert b["bytes_per_device"] == pytest.approx(net["bytes_received"] / devices)
    always = next(p for p in remote["policies"] if p["name"] == "always")
    assert always["network"]["max_concurrent_calls"] == devices
    assert always["network"]["latency_ms"]["p99"] > 0


def test_network_mode_holds_hundreds_of_concurrent_device_agents(trained_model, data):
    ckpt = load_checkpoint(trained_model)
    cfg = SimulationConfig(policies=["always"], users=220, max_steps=3, devices="all", progress=False)
    report = run_simulation(ckpt, data, cfg, mode="network", model_dir=str(trained_model)).report
    net = report["policies"][0]["network"]
    assert report["devices"]["test"] == 220
    assert net["max_concurrent_calls"] == 220  # every device in flight at once, each on its own channel
    assert net["failures"] == 0 and net["calls"] == 220 + report["devices"]["test_steps"]
    assert net["bundles_per_s"] > 0

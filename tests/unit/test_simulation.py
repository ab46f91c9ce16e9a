"""The simulation harness on a tiny model: timelines, cached bundles, replays against direct
scoring, calibration, the report, the ONNX device's agreement, and `paramcast simulate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paramcast.cloud.bundles import generate_bundles, generate_parameters
from paramcast.cloud.checkpoint import Checkpoint, save_checkpoint
from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.generator import build_generator
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad
from paramcast.common.evaluation import metrics_from_scores
from paramcast.common.interactions import InteractionLog
from paramcast.device.ideal import GaussianMapper
from paramcast.device.policy import Always, DriftGate, EveryK, Never, RandomP
from paramcast.device.policy_spec import parse_policy
from paramcast.simulation.cache import FactorTable, Scorer, precompute
from paramcast.simulation.harness import Simulation, SimulationConfig, simulate
from paramcast.simulation.replay import replay
from paramcast.simulation.timelines import build_timelines, split_devices

N_ITEMS = 150


@pytest.fixture(scope="module")
def data() -> InteractionLog:
    rng = np.random.default_rng(0)
    # Users drift between two halves of the catalogue, so behaviour changes along a timeline.
    seqs = []
    for u in range(40):
        n = int(rng.integers(4, 30))
        half = (np.arange(n) * 3 // max(n, 1) + u) % 2
        seqs.append((1 + half * 75 + rng.integers(0, 75, size=n)).astype(np.int64))
    return InteractionLog("synthetic", seqs, N_ITEMS, [str(u + 1) for u in range(40)],
                          [""] + [str(i) for i in range(1, N_ITEMS + 1)])


@pytest.fixture(scope="module")
def ckpt(data) -> Checkpoint:
    torch.manual_seed(0)
    model = DeviceModel(DeviceModelConfig(n_items=N_ITEMS, hidden=8, ffn_units=8, head_units=8, max_len=12,
                                          dropout=0.0)).eval()
    cloud = CloudModel(CloudModelConfig(n_items=N_ITEMS, hidden=8, n_blocks=1, ffn_units=8, max_len=16, dropout=0.0))
    gen = build_generator(model, cloud, width=16, rank=2, dropout=0.0).eval()
    with torch.no_grad():  # untrained B heads are zero (the static model); give deltas that change scores
        for head in gen.b_heads.values():
            head.weight.normal_(0, 0.5)
    cold = [str(u + 1) for u in range(0, 40, 2)]
    return Checkpoint("sasrec-synthetic", model, gen, {"split": {"cold_users": cold}})


@pytest.fixture(scope="module")
def prepared(data, ckpt):
    tl = build_timelines(data, np.arange(data.n_users), warmup=3, n_negatives=20, seed=0)
    return tl, precompute(ckpt, tl, progress=False)


# ---------------------------------------------------------------------------------------------- timelines

def test_timelines_cover_every_step_after_warm_up(data):
    tl = build_timelines(data, np.arange(data.n_users), warmup=3, n_negatives=20)
    lengths = data.lengths() - 3
    assert tl.n_steps == lengths[lengths > 0].sum()
    assert np.all(np.diff(tl.length) <= 0)  # longest first: active devices are a prefix
    for j in (0, 5, tl.max_length - 1):
        assert tl.active(j) == int((tl.length > j).sum())
    for k in range(tl.n_steps):
        seq = data.sequences[int(tl.users[tl.device[k]])]
        assert tl.t[k] == 3 + k - tl.start[tl.device[k]]
        assert tl.candidates[k, 0] == seq[tl.t[k]]
        negatives = tl.candidates[k, 1:]
        assert len(np.unique(negatives)) == 20 and not np.isin(negatives, seq).any() and negatives.min() >= 1
    again = build_timelines(data, np.arange(data.n_users), warmup=3, n_negatives=20)
    assert np.array_equal(again.candidates, tl.candidates)  # same seed, same candidates for every policy


def test_timelines_cap_steps_and_drop_short_users(data):
    tl = build_timelines(data, np.arange(data.n_users), warmup=10, n_negatives=20, max_steps=4)
    assert tl.length.max() == 4
    assert set(tl.users.tolist()) == {u for u in range(data.n_users) if data.lengths()[u] > 10}


def test_split_devices_is_disjoint_and_uses_cold_users(data, ckpt):
    valid, test = split_devices(data, ckpt.meta["split"]["cold_users"], "cold", 0.5)
    assert len(np.intersect1d(valid, test)) == 0 and len(valid) + len(test) == 20
    assert set(valid.tolist()) | set(test.tolist()) == set(range(0, 40, 2))
    v_all, t_all = split_devices(data, [], "all", 0.25)
    assert len(v_all) == 10 and len(t_all) == 30


# ---------------------------------------------------------------------------------------------- cache

def test_factor_table_holds_exactly_what_the_device_decodes(ckpt, data):
    windows = [data.sequences[u][:5] for u in range(3)]
    adapters, _ = generate_parameters(ckpt, windows)
    for encoding in ("int8", "fp16", "fp32"):
        table = FactorTable(ckpt.generator.cfg.slot_shapes, ckpt.generator.cfg.rank, 4, encoding)
        table.put(np.array([1, 2, 3]), {s: (a.numpy(), b.numpy()) for s, (a, b) in adapters.items()})
        for i, b in enumerate(generate_bundles(ckpt, windows)):
            wire = b.quantized(encoding)
            for slot, (a, bb) in table.row(i + 1).items():
                assert np.array_equal(a, wire.factors[slot][0]) and np.array_equal(bb, wire.factors[slot][1])
        assert all(not a.any() and not b.any() for a, b in table.row(0).values())  # row 0 = base model


def test_cached_behaviour_and_head_reproduce_the_device_model(ckpt, prepared):
    tl, cache = prepared
    model = ckpt.device_model
    ks = np.array([0, 7, tl.n_steps - 1])
    hist = [tl.history(int(k)) for k in ks]
    rows = cache.fresh_row(ks, tl.n_devices)
    adapters = cache.table.gather(rows)
    _, scores = Scorer(model)(cache.behaviour[ks], adapters, tl.candidates[ks])
    with torch.no_grad():
        direct = model.score(left_pad(hist, model.cfg.max_len), torch.as_tensor(tl.candidates[ks]), adapters)
    np.testing.assert_allclose(scores, direct.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- replays

def _direct_metrics(ckpt, tl, windows_of_step) -> dict:
    """Score every step directly with the int8 bundle generated from windows_of_step(k)."""
    model = ckpt.device_model
    hist = [tl.history(k) for k in range(tl.n_steps)]
    bundles = generate_bundles(ckpt, [windows_of_step(k) for k in range(tl.n_steps)])
    slots = list(ckpt.generator.cfg.slot_shapes)
    adapters = {s: (torch.from_numpy(np.stack([b.quantized("int8").factors[s][0] for b in bundles])),
                    torch.from_numpy(np.stack([b.quantized("int8").factors[s][1] for b in bundles]))) for s in slots}
    with torch.no_grad():
        scores = model.score(left_pad(hist, model.cfg.max_len), torch.as_tensor(tl.candidates), adapters)
    return metrics_from_scores(scores.numpy())


def test_always_scores_each_step_with_the_bundle_of_its_own_history(ckpt, prepared):
    tl, cache = prepared
    run = replay(Always(), tl, cache, Scorer(ckpt.device_model))
    direct = _direct_metrics(ckpt, tl, lambda k: tl.history(k))
    for m in ("ndcg@10", "hr@10", "auc"):
        np.testing.assert_allclose(run.metrics[m], direct[m], atol=1e-6)
    assert run.requested.all() and run.request_rate == 1.0


def test_never_keeps_the_enrolment_bundle(ckpt, prepared, data):
    tl, cache = prepared
    run = replay(Never(), tl, cache, Scorer(ckpt.device_model))
    seq_of = {k: data.sequences[int(tl.users[tl.device[k]])] for k in range(tl.n_steps)}
    direct = _direct_metrics(ckpt, tl, lambda k: seq_of[k][:3])
    np.testing.assert_allclose(run.metrics["auc"], direct["auc"], atol=1e-6)
    assert not run.requested.any()
    always = replay(Always(), tl, cache, Scorer(ckpt.device_model))
    assert not np.array_equal(run.metrics["auc"], always.metrics["auc"])  # staleness does change scores


def test_equivalent_policies_replay_identically(ckpt, prepared):
    tl, cache = prepared
    scorer = Scorer(ckpt.device_model)
    assert np.array_equal(replay(EveryK(1), tl, cache, scorer).metrics["auc"],
                          replay(Always(), tl, cache, scorer).metrics["auc"])
    assert np.array_equal(replay(RandomP(0.0), tl, cache, scorer).metrics["auc"],
                          replay(Never(), tl, cache, scorer).metrics["auc"])
    a = replay(RandomP(0.3), tl, cache, scorer, seed=5)
    b = replay(RandomP(0.3), tl, cache, scorer, seed=5)
    assert np.array_equal(a.requested, b.requested) and 0.2 < a.request_rate < 0.4


def test_base_start_scores_with_the_static_model_until_the_first_bundle(ckpt, prepared):
    tl, cache = prepared
    run = replay(Never(), tl, cache, Scorer(ckpt.device_model), start="base")
    with torch.no_grad():
        hist = [tl.history(k) for k in range(tl.n_steps)]
        static = ckpt.device_model.score(left_pad(hist, ckpt.device_model.cfg.max_len), torch.as_tensor(tl.candidates))
    np.testing.assert_allclose(run.metrics["auc"], metrics_from_scores(static.numpy())["auc"], atol=1e-6)
    gate = DriftGate(threshold=1e9)
    first = replay(gate, tl, cache, Scorer(ckpt.device_model), start="base")
    assert first.requested[tl.start].all()  # with nothing held, a gate asks at once
    assert not np.delete(first.requested, tl.start).any()


# ---------------------------------------------------------------------------------------------- harness

@pytest.fixture(scope="module")
def report(ckpt, data):
    cfg = SimulationConfig(policies=["never", "always", "every-k", "random-p", "drift", "window", "loss", "ideal"],
                           budgets=[0.2], devices="all", n_negatives=20, progress=False)
    return simulate(ckpt, data, cfg)


def test_report_schema_and_bookkeeping(report):
    names = [p["name"] for p in report["policies"]]
    assert names == ["never", "always", "every-k:k=5", "random-p:p=0.2", "drift:rate=0.2", "window:rate=0.2",
                     "loss:rate=0.2", "ideal:rate=0.2"]
    for p in report["policies"]:
        for m in ("ndcg@10", "hr@10", "auc"):
            assert set(p[m]) == {"value", "ci"} and p[m]["ci"][0] <= p[m]["value"] <= p[m]["ci"][1]
        assert p["bytes_per_device"] == pytest.approx((p["requests_per_device"] + 1) * report["bundle_bytes"])
    by = {p["name"]: p for p in report["policies"]}
    assert by["never"]["request_rate"] == 0 and by["always"]["request_rate"] == 1
    assert by["never"]["gain_kept"]["value"] == 0 and by["always"]["gain_kept"]["value"] == pytest.approx(1)
    assert report["bundle_bytes"] > 0 and report["device_steps_per_s"] > 0
    assert report["devices"]["test"] + report["devices"]["validation"] == 40
    pairs = {(d["a"], d["b"]) for d in report["paired"]}
    assert ("always", "never") in pairs and ("drift:rate=0.2", "random-p:p=0.2") in pairs
    assert ("ideal:rate=0.2", "every-k:k=5") in pairs
    diff = next(d for d in report["paired"] if d["a"] == "always")
    assert diff["ndcg@10"]["value"] == pytest.approx(by["always"]["ndcg@10"]["value"] - by["never"]["ndcg@10"]["value"])
    assert by["always"]["vs_never"]["ndcg@10"] == diff["ndcg@10"]
    # what any gate at a budget could beat a baseline by: always against that baseline, paired
    room = next(d for d in report["paired"] if d["why"].startswith("headroom") and d["b"] == "every-k:k=5")
    assert room["a"] == "always"
    assert room["ndcg@10"]["value"] == pytest.approx(by["always"]["ndcg@10"]["value"]
                                                     - by["every-k:k=5"]["ndcg@10"]["value"])
    assert by["never"]["vs_never"]["auc"] == {"value": 0.0, "ci": [0.0, 0.0]}
    json.dumps(report)  # serialisable as is


def test_gates_are_calibrated_on_validation_devices(report):
    for p in report["policies"]:
        if p["policy"] in ("drift", "window", "loss", "ideal"):
            assert p["validation"]["request_rate"] == pytest.approx(0.2, abs=0.03)
            assert p["policy_config"]["threshold"] == p["validation"]["threshold"]
    selected = report["selected_gates"][0]
    assert selected["budget"] == 0.2 and selected["name"] == max(selected["validation"],
                                                                 key=selected["validation"].get)


def test_calibration_never_replays_test_devices(ckpt, data, monkeypatch):
    sim = Simulation(ckpt, data, SimulationConfig(policies=["drift"], budgets=[0.2], devices="all",
                                                    n_negatives=20, progress=False))
    seen = []
    original = sim.replay

    def spy(policy, on, name, source=None):
        seen.append((name, on is sim.test))
        return original(policy, on, name, source)

    monkeypatch.setattr(sim, "replay", spy)
    sim.run()
    assert [name for name, on_test in seen if on_test] == ["drift:rate=0.2"]  # only the final measurement


def test_report_writes_table_and_plots(report, tmp_path):
    from paramcast.simulation.report import plot, table, write_json

    text = table(report)
    assert "drift:rate=0.2" in text and "device-steps/s" in text
    files = plot(report, tmp_path)
    assert all(f.stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG" for f in files)
    assert json.loads(write_json(report, tmp_path / "r.json").read_text())["policies"][0]["name"] == "never"


# ---------------------------------------------------------------------------------------------- device agreement

def test_onnx_device_scores_what_the_harness_scores(ckpt, prepared, tmp_path):
    from paramcast.cloud.export import export_package
    from paramcast.common.package import DevicePackage
    from paramcast.device.ideal import item_embeddings
    from paramcast.device.runtime import DeviceRuntime

    tl, cache = prepared
    package = DevicePackage.load(export_package(ckpt, tmp_path / "pkg"))
    np.testing.assert_array_equal(item_embeddings(package), cache.item_emb)
    runtime = DeviceRuntime(package, threads=1)
    k = int(tl.start[0]) + 5  # step 5 of the longest device: the request after step k - 1 used its history
    b = generate_bundles(ckpt, [tl.history(k)])[0].quantized("int8")
    runtime.apply(b)
    _, scores = Scorer(ckpt.device_model)(cache.behaviour[[k]], cache.table.gather(cache.fresh_row(np.array([k - 1]),
                                                                                              tl.n_devices)),
                                      tl.candidates[[k]])
    np.testing.assert_allclose(runtime.score(tl.history(k), tl.candidates[k]), scores[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runtime.behaviour_embedding(tl.history(k)), cache.behaviour[k], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- CLI

def test_simulate_command_writes_report_and_plots(ckpt, data, tmp_path, capsys):
    from paramcast.cli import main

    model_dir = save_checkpoint(ckpt, tmp_path / "model")
    pairs = tmp_path / "synthetic.txt"
    pairs.write_text("".join(f"{u + 1} {i}\n" for u, seq in enumerate(data.sequences) for i in seq))
    out = tmp_path / "out"
    code = main(["simulate", "--model", str(model_dir), "--data", str(pairs), "--policy", "never", "always",
                 "random-p", "drift:rate=0.3,min_interval=2", "ideal", "--budget", "0.3", "--out", str(out),
                 "--no-progress", "--threads", "1", "--devices", "all"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random-p:p=0.3" in printed and "drift:rate=0.3,min_interval=2" in printed
    doc = json.loads((out / "simulation-synthetic.json").read_text())
    assert {p["name"] for p in doc["policies"]} == {"never", "always", "random-p:p=0.3",
                                                    "drift:rate=0.3,min_interval=2", "ideal:rate=0.3"}
    assert (out / "simulation-synthetic-quality-vs-rate.png").is_file()
    mapper = GaussianMapper.load(out / "ideal-mapper-synthetic.npz")  # what a device would load for the gate
    assert mapper.w_mean.shape == (2 * ckpt.device_model.cfg.hidden + 1, ckpt.device_model.cfg.hidden)
    assert str(out / "ideal-mapper-synthetic.npz") in doc["files"]
    assert parse_policy(doc["policies"][3]["name"]).params["min_interval"] == 2


def test_simulate_command_reports_bad_policies(ckpt, tmp_path, capsys, data):
    from paramcast.cli import main

    model_dir = save_checkpoint(ckpt, tmp_path / "model")
    pairs = tmp_path / "synthetic.txt"
    pairs.write_text("".join(f"{u + 1} {i}\n" for u, seq in enumerate(data.sequences) for i in seq))
    assert main(["simulate", "--model", str(model_dir), "--data", str(pairs), "--policy", "drift:speed=1"]) == 2
    assert "no parameter 'speed'" in capsys.readouterr().err


def test_headline_states_gain_gate_share_and_bytes():
    from paramcast.simulation.report import headline

    ci = lambda v, lo, hi: {"value": v, "ci": [lo, hi]}  # noqa: E731
    report = {
        "paired": [{"a": "always", "b": "never", "ndcg@10": ci(0.02, 0.01, 0.03)}],
        "bars": {"evaluated": True, "gate": "loss:rate=0.1", "request_rate": 0.1, "gain_kept": ci(0.93, 0.8, 1.05)},
        "policies": [{"name": "always", "bytes_per_device": 10_000},
                     {"name": "loss:rate=0.1", "bytes_per_device": 1_000}],
    }
    lines = headline(report)
    assert lines[0].startswith("gain from fresh bundles (always - never): NDCG@10 0.0200 [0.0100, 0.0300]")
    assert "keeps 93% [80%, 105%]" in lines[1] and "(10.0%)" in lines[2] and len(lines) == 3
    report["bars"]["beats_every-k"] = {"ndcg@10": ci(-0.001, -0.003, 0.001), "ci_above_zero": False}
    report["bars"]["headroom_over_every-k"] = {"ndcg@10": ci(0.0015, -0.0009, 0.004), "ci_above_zero": False}
    assert headline(report)[3] == ("the gate against the baselines at its budget, NDCG@10: every-k -0.0010 "
                                   "[-0.0030, 0.0010] (always - every-k 0.0015 [-0.0009, 0.0040])")
    report["paired"][0]["ndcg@10"] = ci(0.001, -0.002, 0.004)
    lines = headline(report)
    assert "not shown" in lines[0] and not any("keeps" in line for line in lines)


# ---------------------------------------------------------------------------------------------- shards

def test_shards_hold_every_device_and_step_once_and_map_back(prepared):
    from paramcast.simulation.shards import plan

    tl, _ = prepared
    shards = plan(tl, 7)
    assert shards.n_shards == -(-tl.n_devices // 7)
    assert sorted(np.concatenate(shards.rows).tolist()) == list(range(tl.n_devices))
    assert sorted(np.concatenate(shards.steps).tolist()) == list(range(tl.n_steps))
    for rows, steps, sub in zip(shards.rows, shards.steps, shards.tls, strict=True):
        assert np.all(np.diff(tl.length[rows]) <= 0)  # each shard still replays longest first
        np.testing.assert_array_equal(sub.candidates, tl.candidates[steps])
        np.testing.assert_array_equal(sub.t, tl.t[steps])
    asked = np.array([5, 0, tl.n_steps - 1, 17])
    for (local, where), steps in zip(shards.local(asked), shards.steps, strict=True):
        np.testing.assert_array_equal(steps[local], asked[where])
    assert sum(len(where) for _, where in shards.local(asked)) == len(asked)
    assert plan(tl, tl.n_devices).n_shards == 1


def test_a_sharded_simulation_replays_each_shard_as_its_own_fleet(ckpt, data):
    from paramcast.simulation.report import without_timings

    cfg = dict(policies=["never", "always", "random-p", "drift", "ideal"], budgets=[0.2], devices="all",
               n_negatives=20, progress=False)
    one = simulate(ckpt, data, SimulationConfig(**cfg))
    three = simulate(ckpt, data, SimulationConfig(**cfg, shard_devices=7))
    assert one["devices"]["shards"] == {"test": 1, "validation": 1}
    assert three["devices"]["shards"] == {"test": 3, "validation": 3}
    a, b = without_timings(one), without_timings(three)
    by = {p["name"]: p for p in b["policies"]}
    for p in a["policies"]:
        if p["name"] in ("never", "always"):  # no randomness and no calibration: the same steps scored alike
            assert by[p["name"]]["request_rate"] == p["request_rate"]
            assert by[p["name"]]["ndcg@10"]["value"] == pytest.approx(p["ndcg@10"]["value"], abs=1e-6)
    assert without_timings(simulate(ckpt, data, SimulationConfig(**cfg, shard_devices=7))) == b  # reproducible

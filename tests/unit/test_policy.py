"""Request policies: spec parsing, each policy's decisions, gate scores, mapper fitting, calibration."""

from __future__ import annotations

import itertools
import textwrap

import numpy as np
import pytest
from without_torch import run_without_torch

from paramcast.common.errors import InvalidInput
from paramcast.device.ideal import GaussianMapper, IdealGate, mapper_features
from paramcast.device.policy import (
    Always,
    DriftGate,
    EveryK,
    LossGate,
    Never,
    RandomP,
    StepView,
    WindowGate,
)
from paramcast.device.policy_spec import build_policy, parse_policy
from paramcast.simulation.calibration import calibrate_threshold, fit_gaussian_mapper

D_HIDDEN = 4


def view(n: int, behaviour: np.ndarray | None = None, scores: np.ndarray | None = None,
         observed: np.ndarray | None = None, devices: np.ndarray | None = None, n_cand: int = 5) -> StepView:
    devices = np.arange(n) if devices is None else devices
    behaviour = np.ones((n, D_HIDDEN), np.float32) if behaviour is None else behaviour.astype(np.float32)
    scores = np.zeros((n, n_cand), np.float32) if scores is None else scores.astype(np.float32)
    observed = np.zeros(n, np.int64) if observed is None else observed
    cands = np.tile(np.arange(1, n_cand + 1), (n, 1))
    return StepView(devices, behaviour, behaviour.copy(), scores, cands, observed)


def run_steps(policy, n_devices: int, steps: int, seed: int = 0) -> np.ndarray:
    """(steps, n_devices) request decisions of a policy fed a constant view."""
    policy.start(n_devices, seed, np.ones((n_devices, D_HIDDEN), np.float32))
    out = []
    for _ in range(steps):
        v = view(n_devices)
        r = policy.decide(v)
        policy.applied(v.devices[r], v.behaviour[r])
        out.append(r)
    return np.array(out)


# ---------------------------------------------------------------------------------------------- specs

def test_parse_bare_values_set_the_primary_parameter():
    assert parse_policy("every-k:10").params == {"k": 10}
    assert parse_policy("random-p:0.25").params == {"p": 0.25}
    assert parse_policy("drift:0.1").params == {"rate": 0.1}
    spec = parse_policy("drift:rate=0.1,min_interval=3,metric=l2")
    assert spec.params == {"rate": 0.1, "min_interval": 3, "metric": "l2"}
    assert spec.is_gate and not spec.rate_free


@pytest.mark.parametrize("text, fragment", [
    ("sometimes", "unknown policy"),
    ("never:3", "no bare value"),
    ("every-k:k=ten", "k must be int"),
    ("drift:speed=2", "no parameter 'speed'"),
    ("random-p:0.1,0.2", "no bare value"),
])
def test_parse_rejects_bad_specs_naming_the_problem(text, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        parse_policy(text)


def test_budget_fills_in_only_specs_without_a_rate():
    assert parse_policy("every-k").at_budget(0.1).params == {"k": 10}
    assert parse_policy("random-p").at_budget(0.1).params == {"p": 0.1}
    assert parse_policy("loss:min_interval=2").at_budget(0.05).text == "loss:min_interval=2,rate=0.05"
    fixed = parse_policy("every-k:4")
    assert fixed.at_budget(0.1) is fixed
    assert parse_policy("always").at_budget(0.1).params == {}


def test_build_needs_the_rate_and_the_ideal_gate_its_mapper():
    with pytest.raises(InvalidInput, match="needs k"):
        build_policy(parse_policy("every-k"))
    with pytest.raises(InvalidInput, match="mapper"):
        build_policy(parse_policy("ideal:0.1"))
    with pytest.raises(InvalidInput, match="threshold or rate"):
        build_policy(parse_policy("drift:threshold=0.1,rate=0.1"))
    assert isinstance(build_policy(parse_policy("drift:threshold=0.2")), DriftGate)


# ---------------------------------------------------------------------------------------------- baselines

def test_never_and_always():
    assert not run_steps(Never(), 3, 10).any()
    assert run_steps(Always(), 3, 10).all()


def test_min_interval_spaces_requests():
    decisions = run_steps(Always(min_interval=3), 2, 12)
    assert decisions[:, 0].tolist() == [False, False, True] * 4  # third step after each request


def test_every_k_aligned_requests_every_k_steps():
    decisions = run_steps(EveryK(4, phase="0"), 3, 12)
    assert decisions.all(axis=1).tolist() == [False, False, False, True] * 3


def test_every_k_random_phase_spreads_requests_at_rate_one_over_k():
    decisions = run_steps(EveryK(5), 500, 20)
    assert decisions.mean() == pytest.approx(0.2, abs=1e-9)  # every device exactly 4 times in 20 steps
    assert (decisions.sum(axis=0) == 4).all()
    assert len({tuple(np.flatnonzero(decisions[:, d])) for d in range(500)}) == 5  # 5 distinct phases


def test_random_p_rate_and_seeding():
    a = run_steps(RandomP(0.1), 1000, 20, seed=3)
    b = run_steps(RandomP(0.1), 1000, 20, seed=3)
    assert (a == b).all()
    assert a.mean() == pytest.approx(0.1, abs=0.01)
    assert not (a == run_steps(RandomP(0.1), 1000, 20, seed=4)).all()


def test_gate_without_threshold_refuses_to_decide():
    g = DriftGate(rate=0.1)
    g.start(1, 0, np.ones((1, D_HIDDEN)))
    with pytest.raises(InvalidInput, match="not calibrated"):
        g.decide(view(1))


# ---------------------------------------------------------------------------------------------- gates

def test_drift_measures_change_since_the_bundle_and_resets_when_one_arrives():
    g = DriftGate(threshold=0.5)
    ref = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    g.start(2, 0, ref)
    now = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)  # device 0 unchanged, device 1 orthogonal
    v = view(2, behaviour=now)
    assert g.score(v, np.ones(2, np.int64)) == pytest.approx([0.0, 1.0])
    assert g.decide(v).tolist() == [False, True]
    g.applied(np.array([1]), now[1:])
    assert g.score(view(2, behaviour=now), np.ones(2, np.int64)) == pytest.approx([0.0, 0.0])
    l2 = DriftGate(threshold=1.0, metric="l2")
    l2.start(2, 0, ref)
    assert l2.score(v, np.ones(2, np.int64)) == pytest.approx([0.0, np.sqrt(2.0)])


def test_gates_request_at_once_for_devices_holding_no_bundle():
    g = DriftGate(threshold=10.0)
    g.start(3, 0, None)  # devices start on the base model
    assert g.decide(view(3)).all()
    g.applied(np.arange(3), np.ones((3, D_HIDDEN), np.float32))
    assert not g.decide(view(3)).any()


def test_loss_is_one_minus_ndcg_of_the_taken_items_rank():
    scores = np.array([[2.0, 0.0, -1.0, 5.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [9.0, 1.0, 0.0, 0.0]])
    observed = np.array([1, 0, -1, 0])
    g = LossGate(threshold=0.5, decay=0.0)  # no memory: the score is this step's loss
    g.start(4, 0, np.ones((4, D_HIDDEN)))
    loss = g.score(view(4, scores=scores, observed=observed), np.ones(4, np.int64))
    assert loss[0] == pytest.approx(1 - 1 / np.log2(2 + 2))  # two candidates score higher
    assert loss[1] == pytest.approx(1 - 1 / np.log2(2 + 3))  # ties count against it: rank 3
    assert loss[2] == 0.0  # the taken item was not a candidate: nothing to learn from
    assert loss[3] == 0.0  # ranked first
    one = LossGate(threshold=0.5, decay=0.0)  # the one-device path computes the same losses
    one.start(4, 0, np.ones((4, D_HIDDEN)))
    for d in range(4):
        single = view(1, scores=scores[[d]], observed=observed[[d]], devices=np.array([d]))
        assert one.score_one(single, d, 1) == pytest.approx(loss[d])


def test_loss_gate_tracks_recent_loss_and_restarts_with_a_bundle():
    g = LossGate(threshold=0.5, decay=0.5)
    g.start(1, 0, np.ones((1, D_HIDDEN)))
    good = np.array([[10.0, 0, 0, 0, 0]])  # the observed candidate (column 0) is ranked first
    bad = np.array([[-10.0, 0, 0, 0, 0]])  # ... ranked last
    age = np.ones(1, np.int64)
    assert g.score(view(1, scores=good), age)[0] == 0.0  # bias-corrected: the one loss seen so far
    s_bad = g.score(view(1, scores=bad), age)[0]
    assert s_bad == pytest.approx(0.5 * (1 - 1 / np.log2(6)) / 0.75)  # (0.5 * 0 + 0.5 * bad) / (1 - 0.25)
    g.score(view(1, scores=bad, observed=np.array([-1])), age)  # nothing observed: no update
    assert g.score(view(1, scores=bad), age)[0] > s_bad
    g.applied(np.array([0]), np.ones((1, D_HIDDEN)))
    assert g.score(view(1, scores=good), age)[0] == 0.0  # the bad steps were forgotten


def _mapper(mean_scale: float, log_var: float) -> GaussianMapper:
    w_mean = np.zeros((2 * D_HIDDEN + 1, D_HIDDEN), np.float32)
    w_mean[:D_HIDDEN] = mean_scale * np.eye(D_HIDDEN)  # mean change = scale * (behaviour - ref)
    w_log_var = np.zeros((2, D_HIDDEN), np.float32)
    w_log_var[1] = log_var  # constant variance
    return GaussianMapper(w_mean, w_log_var)


def test_ideal_gate_grows_with_predicted_change_and_uncertainty():
    emb = np.random.default_rng(0).normal(size=(6, D_HIDDEN)).astype(np.float32)
    ref = np.zeros((1, D_HIDDEN), np.float32)

    def score(mapper, behaviour):
        g = IdealGate(mapper, emb, threshold=0.1)
        g.start(1, 0, ref)
        return g.score(view(1, behaviour=behaviour), np.ones(1, np.int64))[0]

    still = np.zeros((1, D_HIDDEN), np.float32)
    moved = np.full((1, D_HIDDEN), 2.0, np.float32)
    assert score(_mapper(1.0, -30.0), still) == pytest.approx(0.0, abs=1e-5)  # no change, no spread
    assert score(_mapper(1.0, -30.0), moved) > 0.5  # a predicted change moves the scores
    assert score(_mapper(0.0, 0.0), still) > score(_mapper(0.0, -4.0), still) > 0.0  # spread alone counts
    g = IdealGate(_mapper(1.0, -30.0), emb, threshold=0.1)
    g.start(1, 0, ref)
    before = g.score(view(1, behaviour=moved), np.ones(1, np.int64))[0]
    g.applied(np.array([0]), moved)  # a bundle generated at this behaviour: nothing left to change
    assert before > 0.5 and g.score(view(1, behaviour=moved), np.ones(1, np.int64))[0] == pytest.approx(0.0, abs=1e-4)


def test_ideal_gate_is_the_expected_spread_of_score_changes_over_the_catalogue():
    """The closed form equals a Monte Carlo estimate of its definition: draws of the change from the
    mapper's Gaussian, the variance across catalogue items of the score moves, averaged, rooted."""
    rng = np.random.default_rng(2)
    d, n_items = D_HIDDEN, 40
    mapper = GaussianMapper(rng.normal(size=(2 * d + 1, d)).astype(np.float32) * 0.3,
                            (rng.normal(size=(2, d)) * [[0.3], [0.5]]).astype(np.float32))
    emb = rng.normal(size=(n_items + 1, d)).astype(np.float32)
    ref, b = rng.normal(size=(1, d)).astype(np.float32), rng.normal(size=(1, d)).astype(np.float32)
    g = IdealGate(mapper, emb, threshold=0.0)
    g.start(1, 0, ref)
    x, z = mapper_features(b, ref)
    mean, log_var = mapper(x, z)
    change = mean + np.exp(0.5 * log_var) * rng.normal(size=(200_000, d))  # (draws, d)
    moves = change @ emb[1:].T.astype(np.float64)  # (draws, items): row 0 of the table is padding
    expected = np.sqrt(moves.var(axis=1, ddof=1).mean())
    assert g.score(view(1, behaviour=b), np.ones(1, np.int64))[0] == pytest.approx(expected, rel=0.01)
    shifted = IdealGate(mapper, emb + 5.0, threshold=0.0)  # a move every item shares ranks nothing
    shifted.start(1, 0, ref)
    assert shifted.score(view(1, behaviour=b), np.ones(1, np.int64))[0] == pytest.approx(float(expected), rel=0.01)


def test_ideal_gate_rejects_a_mapper_of_another_width():
    with pytest.raises(InvalidInput, match="hidden size"):
        IdealGate(_mapper(1.0, 0.0), np.zeros((6, D_HIDDEN + 1), np.float32))


def test_fit_gaussian_mapper_recovers_mean_and_heteroscedastic_variance():
    rng = np.random.default_rng(0)
    n, d = 20000, D_HIDDEN
    ref = rng.normal(size=(n, d)).astype(np.float32)
    behaviour = (ref + rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=(n, 1))).astype(np.float32)
    diff = behaviour - ref
    true_sd = 0.05 * np.sqrt((diff * diff).sum(1, keepdims=True))  # noise grows with the change
    delta = 0.5 * diff + true_sd * rng.normal(size=(n, d))
    mapper = fit_gaussian_mapper(behaviour, ref, delta, ridge=1e-3)
    x, z = mapper_features(behaviour, ref)
    mean, log_var = mapper(x, z)
    assert np.abs(mean - 0.5 * diff).max() < 0.05 * np.abs(diff).max()
    assert np.median(np.abs(log_var[:, 0] - np.log(true_sd[:, 0] ** 2))) < 0.2
    assert mapper.meta["r2_mean"] > 0.9


def test_ideal_gate_one_device_path_matches_the_fleet_path():
    """The single-device path (one product, a table of the variance term) scores as the vectorised,
    exact one does, at a real model's size, for devices at several distances from their held bundle
    (1e9: beyond the table), with variance powers as fitted mappers have them and spanning 6."""
    rng = np.random.default_rng(4)
    d, n_items, n_cand, n = 32, 300, 101, 5
    mapper = GaussianMapper(rng.normal(size=(2 * d + 1, d)).astype(np.float32) * 0.1,
                            rng.normal(size=(2, d)).astype(np.float32) * 0.3)
    wide = GaussianMapper(mapper.w_mean, np.stack([np.linspace(-3, 3, d), mapper.w_log_var[1]]).astype(np.float32))
    for m, scale in itertools.product((mapper, wide), (0.0, 1e-3, 1.0, 10.0, 1000.0, 1e9)):
        gate = IdealGate(m, np.random.default_rng(5).normal(size=(n_items, d)).astype(np.float32) * 0.5,
                         threshold=0.1)
        gate.start(n, 0, np.random.default_rng(6).normal(size=(n, d)).astype(np.float32))
        b = (gate.ref_cat[:, d:] + scale * rng.normal(size=(n, d))).astype(np.float32)
        fleet = gate.score(StepView(np.arange(n), b, b, rng.normal(size=(n, n_cand)).astype(np.float32),
                                    rng.integers(1, n_items, size=(n, n_cand)), np.full(n, 3)), np.ones(n, np.int64))
        for i in range(n):
            v = StepView(np.array([i]), b[i: i + 1], b[i: i + 1], np.zeros((1, n_cand), np.float32),
                         rng.integers(1, n_items, size=(1, n_cand)), np.array([3]))
            one = gate.score_one(v, i, 1)
            assert np.isfinite(one) and one == pytest.approx(float(fleet[i]), rel=5e-5, abs=1e-6)


def test_mapper_save_and_load(tmp_path):
    m = _mapper(0.3, -1.0)
    loaded = GaussianMapper.load(m.save(tmp_path / "mapper.npz"))
    assert np.array_equal(loaded.w_mean, m.w_mean) and np.array_equal(loaded.w_log_var, m.w_log_var)


# ---------------------------------------------------------------------------------------------- calibration

def test_calibrate_threshold_meets_the_target_rate():
    scores = np.random.default_rng(1).lognormal(size=5000)

    def rate_at(threshold: float) -> float:
        return float((scores > threshold).mean())

    threshold, rate = calibrate_threshold(rate_at, 0.1, scores, tolerance=0.001)
    assert rate == pytest.approx(0.1, abs=0.001)
    assert rate_at(threshold) == rate


def test_calibrate_threshold_returns_the_closest_point_when_the_target_is_out_of_reach():
    scores = np.array([1.0, 1.0, 1.0, 2.0])

    def rate_at(threshold: float) -> float:
        return float((scores > threshold).mean())

    _, rate = calibrate_threshold(rate_at, 0.5, scores)
    assert rate == 0.25  # the only rates reachable are 0, 0.25 and 1; 0.25 is closest
    with pytest.raises(InvalidInput):
        calibrate_threshold(rate_at, 0.5, np.array([np.inf]))


def test_single_device_view():
    v = StepView.single(np.ones(4), np.ones(4), np.zeros(3), [4, 5, 6], observed=2, device=0)
    assert v.behaviour.shape == (1, 4) and v.candidates.tolist() == [[4, 5, 6]] and v.observed.tolist() == [2]
    g = DriftGate(threshold=0.5)
    g.start(1, 0, np.ones((1, 4)))
    assert g.decide(v).tolist() == [False]


def _paced(gate):
    gate.threshold = 0.2  # as calibration would set it
    return gate


@pytest.mark.parametrize("make", [
    lambda: EveryK(3),
    lambda: RandomP(0.3),
    lambda: Always(min_interval=2),
    lambda: DriftGate(threshold=0.3),
    lambda: DriftGate(threshold=1.5, metric="l2", min_interval=2),
    lambda: LossGate(threshold=0.4),
    lambda: _paced(DriftGate(rate=0.2, pace=1.5, burst=2.0)),
    lambda: WindowGate(threshold=0.3, size=6),
    lambda: IdealGate(_mapper(0.5, -2.0), np.random.default_rng(5).normal(size=(9, D_HIDDEN)).astype(np.float32),
                      threshold=0.85),
], ids=["every-k", "random-p", "always", "drift", "drift-l2", "loss", "drift-paced", "window", "ideal"])
def test_one_device_at_a_time_decides_as_the_fleet_does(make):
    """The scalar path for a single device (what a phone runs) agrees with the vectorised one."""
    rng = np.random.default_rng(0)
    n, steps = 5, 40
    fleet, single = make(), make()
    start = rng.normal(size=(n, D_HIDDEN)).astype(np.float32)
    fleet.start(n, 3, start)
    single.start(n, 3, start)
    for step in range(steps):
        b = rng.normal(size=(n, D_HIDDEN)).astype(np.float32)
        v = StepView(np.arange(n), b, b, rng.normal(size=(n, 5)).astype(np.float32),
                     rng.integers(1, 9, size=(n, 5)), rng.integers(-1, 5, size=n), np.full(n, 4 + step))
        together = fleet.decide(v)
        alone = []
        for i in range(n):
            one = StepView(np.array([i]), v.behaviour[i:i + 1], v.user_state[i:i + 1], v.scores[i:i + 1],
                           v.candidates[i:i + 1], v.observed[i:i + 1], v.seen[i:i + 1])
            alone.append(single.decide(one)[0])
            if hasattr(single, "last_score"):
                assert single.last_score[0] == pytest.approx(fleet.last_score[i], rel=1e-4, abs=1e-6)
        assert together.tolist() == alone
        fleet.applied(np.flatnonzero(together), b[together])
        single.applied(np.flatnonzero(together), b[together])


def test_pacing_spreads_a_gates_requests_over_devices():
    """A gate that always fires, paced at rate 0.1: every device requests once per 10 steps."""
    g = DriftGate(rate=0.1, pace=1.0)
    g.threshold = -1.0  # always above threshold
    decisions = run_steps(g, 20, 50)
    assert (decisions.sum(axis=0) == 5).all()  # each device: its allowance, no more
    burst = DriftGate(rate=0.1, pace=1.0, burst=3.0)
    burst.threshold = 10.0  # never fires for 30 steps ...
    burst.start(1, 0, np.ones((1, D_HIDDEN)))
    for _ in range(30):
        assert not burst.decide(view(1))[0]
    burst.threshold = -1.0  # ... then fires: the three banked requests go out back to back
    assert [bool(burst.decide(view(1))[0]) for _ in range(5)] == [True, True, True, False, False]
    with pytest.raises(InvalidInput, match="needs the fleet's rate"):
        DriftGate(threshold=0.1, pace=1.0)
    with pytest.raises(InvalidInput, match="burst"):
        DriftGate(rate=0.1, pace=1.0, burst=0.5)


def test_window_gate_measures_the_share_of_the_window_the_bundle_has_not_seen():
    g = WindowGate(threshold=0.5, size=10)
    g.start(2, 0, np.ones((2, D_HIDDEN)), seen=np.array([3, 30]))
    v = view(2)
    v.seen = np.array([4, 31])  # one new interaction each
    assert g.score(v, np.ones(2, np.int64)) == pytest.approx([1 / 4, 1 / 10])
    v.seen = np.array([6, 36])
    assert g.score(v, np.ones(2, np.int64)) == pytest.approx([3 / 6, 6 / 10])
    assert g.decide(v).tolist() == [False, True]
    g.applied(np.array([1]), np.ones((1, D_HIDDEN)))
    v.seen = np.array([7, 37])
    assert g.score(v, np.ones(2, np.int64)) == pytest.approx([4 / 7, 1 / 10])  # device 1 starts over at 36
    v.seen = np.array([50, 80])
    assert g.score(v, np.ones(2, np.int64)) == pytest.approx([1.0, 1.0])  # the whole window is new
    unknown = WindowGate(threshold=0.5, size=10)
    unknown.start(1, 0, np.ones((1, D_HIDDEN)))  # enrolment point unknown: one interaction before
    one = view(1)
    one.seen = np.array([8])
    assert unknown.score(one, np.ones(1, np.int64))[0] == pytest.approx(1 / 8)
    with pytest.raises(InvalidInput, match="StepView.seen"):
        unknown.score(view(1), np.ones(1, np.int64))


def test_window_gate_takes_the_generators_window_as_its_default_size():
    assert build_policy(parse_policy("window:threshold=0.2"), window=200).size == 200
    assert build_policy(parse_policy("window:threshold=0.2,size=7"), window=200).size == 7


def test_policies_run_where_torch_is_not_installed(tmp_path):
    """Policies are device code: numpy only, importable with torch (and the cloud side) absent."""
    code = textwrap.dedent("""
        import numpy as np
        from paramcast.device.policy import StepView
        from paramcast.device.policy_spec import build_policy, parse_policy
        gate = build_policy(parse_policy("window:threshold=0.2,size=10"))
        gate.start(1, 0, np.ones((1, 4)), np.array([3]))
        print(gate.decide(StepView.single(np.ones(4), np.ones(4), np.zeros(3), [1, 2, 3], 0, seen=5))[0])
    """)
    result = run_without_torch(tmp_path, ["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"  # 2 of the 5 items in the window are new: 0.4 > 0.2

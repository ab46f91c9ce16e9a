"""The device runtime against PyTorch, and its boundary: bundles, slimming, inputs, package integrity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from device_fixtures import (
    TINY,
    copy_package,
    random_bundle,
    random_keep,
    real_users,
    tiny_checkpoint,
    tiny_package,
    torch_scores,
)

from paramcast.cli import main as cli
from paramcast.cloud.model import left_pad
from paramcast.common.bundle import ENCODINGS, DeltaBundle
from paramcast.common.errors import IntegrityError, InvalidInput, ModelNotFound, VersionMismatch
from paramcast.common.package import DevicePackage, manifest_digest
from paramcast.common.serde import decode_bundle, encode_bundle
from paramcast.device.runtime import DeviceRuntime

ATOL = 1e-4


@pytest.fixture
def runtime() -> DeviceRuntime:
    return DeviceRuntime(DevicePackage.load(tiny_package()))


@pytest.fixture(scope="module")
def users(shared_data):
    return real_users(shared_data)


# -- parity with PyTorch ----------------------------------------------------------------------

PARITY = [
    pytest.param(None, None, None, id="base"),
    *[pytest.param(enc, None, None, id=f"adapted-{enc}") for enc in ENCODINGS],
    *[pytest.param(None, r, "view", id=f"slimmed-{r}") for r in (0.25, 0.5, 0.75)],
    *[pytest.param(enc, 0.5, "bundle", id=f"adapted-{enc}-bundle-masks-0.5") for enc in ENCODINGS],
    pytest.param("int8", 0.25, "view", id="adapted-int8-on-slimmed-view-0.25"),
]


@pytest.mark.parametrize(("encoding", "keep_ratio", "masks_from"), PARITY)
def test_onnx_runtime_matches_pytorch(runtime, users, encoding, keep_ratio, masks_from):
    keep = random_keep(keep_ratio, seed=1) if keep_ratio else None
    factors = None
    if masks_from == "view":
        runtime = runtime.slimmed(keep)
    if encoding is not None:
        sent = random_bundle(seed=2, masks=keep if masks_from == "bundle" else None)
        received = decode_bundle(encode_bundle(sent, encoding))  # what the device holds after the wire
        runtime.apply(received)
        factors = received.factors  # the torch side uses the same dequantized factors

    expected = torch_scores(users, factors, keep)  # (B, 101)
    batch = runtime.score([h for h, _ in users], np.stack([c for _, c in users]))
    np.testing.assert_allclose(batch, expected, atol=ATOL, rtol=0)
    for (history, candidates), row in zip(users, expected, strict=True):
        np.testing.assert_allclose(runtime.score(history, candidates), row, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", ["masked", "visible"])
def test_the_sasrec_block_exports_and_scores_as_in_pytorch(users, tmp_path, padding):
    """The original SASRec block arrangement (Block docstring), with padding masked or visible to
    attention as in the reference (sequence_inputs), goes through export and the runtime like the
    default one: base, adapted and slimmed scores match PyTorch."""
    from dataclasses import replace

    from paramcast.cloud.checkpoint import Checkpoint
    from paramcast.cloud.export import export_package
    from paramcast.cloud.model import DeviceModel, slice_adapters

    torch.manual_seed(3)
    model = DeviceModel(replace(TINY, block="sasrec", padding_attention=padding))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.item_emb.weight[0].zero_()
    model.eval()
    ckpt = Checkpoint("tiny-sasrec", model)
    rt = DeviceRuntime(DevicePackage.load(export_package(ckpt, tmp_path / "pkg")))
    history = left_pad([h for h, _ in users], TINY.max_len)
    candidates = torch.from_numpy(np.stack([c for _, c in users]))
    bundle = random_bundle(seed=5)
    factors = {s: f for s, f in bundle.factors.items() if s in model.slot_shapes()}  # no cloud table here
    bundle = DeltaBundle(ckpt.model_id, ckpt.base_version, factors, random_keep(0.5))
    adapters = {s: (torch.from_numpy(a)[None], torch.from_numpy(b)[None]) for s, (a, b) in bundle.factors.items()}
    keep = {g: torch.as_tensor(m) for g, m in bundle.masks.items()}
    with torch.no_grad():
        base = model.score(history, candidates).numpy()
        slimmed = model.slimmed(keep).score(history, candidates, slice_adapters(adapters, keep)).numpy()
    np.testing.assert_allclose(rt.score([h for h, _ in users], candidates.numpy()), base, atol=ATOL)
    rt.apply(bundle)
    np.testing.assert_allclose(rt.score([h for h, _ in users], candidates.numpy()), slimmed, atol=ATOL)
    assert not np.allclose(base, slimmed, atol=1e-3)
    with torch.no_grad():  # and it is another function than the default block of the same weights
        default = DeviceModel(TINY)
        default.load_state_dict(model.state_dict())
        assert not np.allclose(default.eval().score(history, candidates).numpy(), base, atol=1e-3)


def test_parity_is_not_vacuous(runtime, users):
    """Adapters and slimming change the scores far beyond the tolerance, so parity tests them."""
    base = runtime.score([h for h, _ in users], np.stack([c for _, c in users]))
    runtime.apply(random_bundle(seed=2))
    adapted = runtime.score([h for h, _ in users], np.stack([c for _, c in users]))
    slim = runtime.slimmed(random_keep(0.5)).score([h for h, _ in users], np.stack([c for _, c in users]))
    assert np.abs(adapted - base).max() > 100 * ATOL
    assert np.abs(slim - base).max() > 100 * ATOL


# -- bundles ----------------------------------------------------------------------------------


def test_apply_swaps_factors_without_rebuilding_the_session(runtime, users):
    history, candidates = users[2]
    base_session = runtime.active_session
    base = runtime.score(history, candidates)
    bundle = random_bundle(seed=3)
    runtime.apply(bundle)
    assert runtime.active_session is base_session  # same session, new inputs
    assert runtime.active_bundle_id == bundle.bundle_id
    assert not np.allclose(runtime.score(history, candidates), base, atol=1e-3)
    runtime.revert()
    assert runtime.active_bundle_id is None
    np.testing.assert_array_equal(runtime.score(history, candidates), base)


def test_bundle_masks_switch_to_a_cached_slimmed_session(runtime, users):
    history, candidates = users[1]
    keep = random_keep(0.5, seed=4)
    runtime.apply(random_bundle(seed=5, masks=keep))
    slim_session = runtime.active_session
    assert slim_session is not runtime.slimmed({}).active_session
    for group, mask in keep.items():
        np.testing.assert_array_equal(runtime.active_keep[group], mask)
    runtime.apply(random_bundle(seed=6, masks=keep))  # same mask, new factors: no new session
    assert runtime.active_session is slim_session
    assert runtime.slimmed_sessions_built == 1
    runtime.apply(random_bundle(seed=6))  # no masks: back on the full graph
    assert runtime.active_keep == {}
    assert runtime.slimmed_sessions_built == 1


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_slimmed_graph_drops_exactly_the_sliced_weights(runtime, ratio):
    keep = random_keep(ratio)
    dropped_units = sum(int((~m).sum()) for m in keep.values())
    # Every unit of every group owns one weight row in, one weight column out and one bias.
    dropped_bytes = dropped_units * (2 * TINY.hidden + 1) * 4
    saved = runtime.active_model_nbytes - runtime.slimmed(keep).active_model_nbytes
    assert abs(saved - dropped_bytes) < 64  # protobuf length prefixes shrink by a few bytes too


def test_failed_apply_leaves_the_active_bundle_in_place(runtime, users):
    history, candidates = users[0]
    good = random_bundle(seed=7)
    runtime.apply(good)
    before = runtime.score(history, candidates)
    stale = DeltaBundle(good.model_id, "0123456789abcdef", good.factors)
    with pytest.raises(VersionMismatch, match="base version"):
        runtime.apply(stale)
    with pytest.raises(VersionMismatch, match="model"):
        runtime.apply(DeltaBundle("another-model", good.base_version, good.factors))
    assert runtime.active_bundle_id == good.bundle_id
    np.testing.assert_array_equal(runtime.score(history, candidates), before)


def _bad_bundles():
    b = random_bundle(seed=8)
    up_a, up_b = b.factors["head.up"]
    d = TINY.hidden
    nan = up_a.copy()
    nan[0, 0] = np.nan
    full_rank = (np.ones((d, d + 1)), np.ones((d + 1, TINY.head_units)))  # rank above min(d_in, d_out)
    return [
        pytest.param({"head.sideways": (up_a, up_b)}, {}, "factors['head.sideways']", id="unknown-slot"),
        pytest.param({"head.up": (up_a[:-1], up_b)}, {}, "factors['head.up']", id="wrong-d_in"),
        pytest.param({"head.up": (up_b.T, up_a.T)}, {}, "factors['head.up']", id="transposed"),
        pytest.param({"head.up": full_rank}, {}, "factors['head.up']", id="rank-above-max"),
        pytest.param({"head.up": (nan, up_b)}, {}, "factors['head.up']", id="nan"),
        # finite, but large enough to overflow float32 on the way to a score (a fuzzed bundle found it)
        pytest.param({"head.up": (up_a * 1e30, up_b)}, {}, "factors['head.up']", id="overflowing"),
        pytest.param({}, {"tail": np.ones(4, bool)}, "masks['tail']", id="unknown-group"),
        pytest.param({}, {"head": np.ones(TINY.head_units + 1, bool)}, "masks['head']", id="mask-length"),
    ]


@pytest.mark.parametrize(("factors", "masks", "field"), _bad_bundles())
def test_apply_rejects_malformed_bundles_naming_the_field(runtime, factors, masks, field):
    b = tiny_checkpoint()
    bundle = DeltaBundle(b.model_id, b.base_version, factors, masks)
    with pytest.raises(InvalidInput) as err:
        runtime.apply(bundle)
    assert err.value.field == field
    assert runtime.active_bundle_id is None


# -- inputs -----------------------------------------------------------------------------------


def test_one_user_equals_the_matching_batch_row(runtime, users):
    histories = [h for h, _ in users]
    candidates = np.stack([c for _, c in users])
    batch = runtime.score(histories, candidates)
    assert batch.shape == (len(users), 101) and batch.dtype == np.float32
    padded = left_pad(histories, TINY.max_len).numpy()
    np.testing.assert_allclose(runtime.score(padded, candidates), batch, atol=1e-6)  # 2-D array form
    long_history = users[-1][0]
    assert len(long_history) > TINY.max_len  # keeps the last max_len items, as training does
    np.testing.assert_array_equal(runtime.score(long_history, users[-1][1]),
                                  runtime.score(list(long_history[-TINY.max_len:]), users[-1][1]))


def test_new_user_with_empty_history_gets_finite_scores(runtime):
    scores = runtime.score([], [1, 2, 3])
    assert scores.shape == (3,) and np.isfinite(scores).all()


N = TINY.n_items
BAD_INPUTS = [
    pytest.param([1.0, 2.0], [3, 4], "history", "integers", id="float-history"),
    pytest.param([1, 2], np.array([3, 4], dtype=np.float32), "candidates", "integers", id="float-candidates"),
    pytest.param([1, N + 1], [3, 4], "history", f"outside [0, {N}]", id="history-id-too-large"),
    pytest.param([1, 2], [-1, 4], "candidates", f"outside [0, {N}]", id="negative-candidate"),
    pytest.param([1, 2], [], "candidates", "empty", id="empty-candidates"),
    pytest.param([1, 2], [[3, 4]], "candidates", "1-D", id="batched-candidates-for-one-user"),
    pytest.param([[1, 2], [3]], [[3, 4]], "candidates", "rows for 2 histories", id="row-count"),
    pytest.param([[1, 2], [3]], [[3, 4], [5]], "candidates", "different lengths", id="ragged-candidates"),
    pytest.param([[1, 2], [3, N + 5]], [[3], [4]], "history[1]", "outside", id="bad-row-named"),
    pytest.param(np.zeros((1, 2, 3), np.int64), [[3]], "history", "shape", id="3-D-history"),
    pytest.param("1,2,3", [3], "history", "sequence", id="string-history"),
    pytest.param(np.array([True, False]), [3], "history", "integers", id="bool-history"),
]


@pytest.mark.parametrize(("history", "candidates", "field", "problem"), BAD_INPUTS)
def test_inputs_are_checked_at_the_boundary(runtime, history, candidates, field, problem):
    with pytest.raises(InvalidInput, match=problem.replace("[", r"\[")) as err:
        runtime.score(history, candidates)
    assert err.value.field == field


def test_ids_of_any_integer_dtype_are_accepted(runtime, users):
    history, candidates = users[3]
    expected = runtime.score(history, candidates)
    got = runtime.score(history.astype(np.int32), candidates.astype(np.uint16))
    np.testing.assert_array_equal(got, expected)


def test_behaviour_embedding_ignores_the_applied_bundle(runtime, users):
    histories = [h for h, _ in users]
    before = runtime.behaviour_embedding(histories)
    assert before.shape == (len(users), TINY.hidden)
    runtime.apply(random_bundle(seed=9, masks=random_keep(0.5)))
    np.testing.assert_array_equal(runtime.behaviour_embedding(histories), before)
    np.testing.assert_array_equal(runtime.behaviour_embedding(histories[0]), before[0])
    with torch.no_grad():
        expected = tiny_checkpoint().device_model.encode(left_pad(histories, TINY.max_len))[:, -1, :].numpy()
    np.testing.assert_allclose(before, expected, atol=ATOL)


def test_user_state_is_what_candidates_are_scored_against(runtime, users):
    """Without head.cloud factors the scores are the user state's dot products with the device's
    item vectors; the cloud slot adds its own part on top and leaves the user state alone."""
    history, candidates = users[2]
    bundle = random_bundle(seed=11, masks=random_keep(0.75))
    head_only = DeltaBundle(bundle.model_id, bundle.base_version,
                            {s: f for s, f in bundle.factors.items() if s != "head.cloud"}, bundle.masks)
    runtime.apply(head_only)
    state = runtime.user_state(history)  # (d,)
    item_emb = tiny_checkpoint().device_model.item_emb.weight.detach().numpy()
    np.testing.assert_allclose(item_emb[candidates] @ state, runtime.score(history, candidates), atol=1e-5)
    assert runtime.user_state([history, history]).shape == (2, TINY.hidden)
    runtime.apply(bundle)
    np.testing.assert_allclose(runtime.user_state(history), state, atol=1e-6)
    assert np.abs(runtime.score(history, candidates) - item_emb[candidates] @ state).max() > 100 * ATOL


@pytest.mark.parametrize(("threads", "optimization"), [(0, "all"), (1, "maximal"), (1.5, "all")])
def test_session_options_are_validated(threads, optimization):
    with pytest.raises(InvalidInput):
        DeviceRuntime(DevicePackage.load(tiny_package()), threads=threads, optimization=optimization)


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended", "all"])
def test_every_optimisation_level_scores_the_same(users, optimization):
    rt = DeviceRuntime(DevicePackage.load(tiny_package()), threads=2, optimization=optimization)
    history, candidates = users[4]
    np.testing.assert_allclose(rt.score(history, candidates), torch_scores([users[4]])[0], atol=ATOL)


# -- package integrity ------------------------------------------------------------------------


def test_tampered_model_file_is_named(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    data = bytearray((pkg / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkg / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.onnx: sha256"):
        DevicePackage.load(pkg)


def test_missing_file_and_bad_manifest_are_reported(tmp_path):
    with pytest.raises(ModelNotFound, match="no device package"):
        DevicePackage.load(tmp_path / "nowhere")
    pkg = copy_package(tmp_path / "pkg")
    (pkg / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx: listed in the manifest but missing"):
        DevicePackage.load(pkg)
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="manifest.json: not valid JSON"):
        DevicePackage.load(pkg)


def edit_manifest(pkg, edit, reseal: bool = False) -> None:
    """Change the package's manifest on disk; `reseal` also recomputes its digest (a deliberate
    edit by someone who knows the format, to reach the checks behind the digest)."""
    manifest = json.loads((pkg / "manifest.json").read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_cannot_point_outside_the_package(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    edit_manifest(pkg, lambda m: m["files"].update({"../secret": {"sha256": "0" * 64, "bytes": 1}}), reseal=True)
    with pytest.raises(IntegrityError, match="'../secret' is not a plain file name"):
        DevicePackage.load(pkg)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(max_len=m["max_len"] + 10),  # loaded fine, then every score() failed in ONNX Runtime
    lambda m: m["slots"]["head.up"].update(max_rank=m["slots"]["head.up"]["max_rank"] + 4),  # went unnoticed
    lambda m: m.update(hidden=m["hidden"] * 2),  # went unnoticed
    lambda m: m.pop("manifest_sha256"),
], ids=["max_len", "max_rank", "hidden", "no digest"])
def test_an_edited_manifest_is_refused_at_load(tmp_path, edit):
    pkg = copy_package(tmp_path / "pkg")
    edit_manifest(pkg, edit)
    with pytest.raises(IntegrityError, match="manifest.json: (manifest_sha256 does not match|no manifest_sha256)"):
        DevicePackage.load(pkg)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(max_len=m["max_len"] + 10), "max_len is 30, but the graph's input 'history' has 20"),
    (lambda m: m.update(hidden=m["hidden"] * 2), "hidden is 32, but the graph's output 'user_state' has 16"),
    (lambda m: m["slots"]["head.up"].update(d_in=7, max_rank=4), r"slots\['head.up'\].d_in is 7"),
])
def test_a_resealed_manifest_that_disagrees_with_its_graph_is_refused_by_the_runtime(tmp_path, edit, message):
    pkg = copy_package(tmp_path / "pkg")
    edit_manifest(pkg, edit, reseal=True)
    package = DevicePackage.load(pkg)  # the digest matches: only the graph can tell
    with pytest.raises(IntegrityError, match=message):
        DeviceRuntime(package)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["slots"]["head.up"].update(max_rank=0), "slots.head.up.max_rank: must be >= 1"),
    (lambda m: m["slots"]["head.up"].update(max_rank=10**6), "max_rank 1000000 exceeds min"),
    (lambda m: m.update(n_items=-1), "n_items: must be >= 1"),
    (lambda m: m["files"]["model.onnx"].update(bytes=10), "more than the 10 bytes"),
])
def test_manifest_values_are_validated(tmp_path, edit, message):
    pkg = copy_package(tmp_path / "pkg")
    edit_manifest(pkg, edit, reseal=True)
    with pytest.raises(IntegrityError, match=message):
        DevicePackage.load(pkg)


# -- command line -----------------------------------------------------------------------------


def test_device_score_command(tmp_path, capsys, runtime):
    pkg = str(tiny_package())
    args = ["device", "score", "--package", pkg, "--history", "1,2,3", "--candidates", "4,5,6"]
    assert cli([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == [4, 5, 6] and out["bundle_id"] is None
    np.testing.assert_allclose(out["scores"], runtime.score([1, 2, 3], [4, 5, 6]), atol=1e-6)

    bundle = random_bundle(seed=10)
    (tmp_path / "b.bin").write_bytes(encode_bundle(bundle, "fp16"))
    assert cli([*args, "--bundle", str(tmp_path / "b.bin")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert bundle.bundle_id in lines[0]
    runtime.apply(bundle.quantized("fp16"))
    expected = runtime.score([1, 2, 3], [4, 5, 6])
    got = [float(line.split("\t")[1]) for line in lines[2:]]
    np.testing.assert_allclose(got, expected, atol=1e-5)

    assert cli(["device", "score", "--package", pkg, "--history", "1,x", "--candidates", "4"]) == 2
    assert "history" in capsys.readouterr().err

"""The export contract: what `model.onnx` and `manifest.json` promise a device."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from device_fixtures import CLOUD_ITEMS, TINY, tiny_checkpoint, tiny_package

from paramcast.cli import main as cli
from paramcast.cloud.checkpoint import save_checkpoint
from paramcast.cloud.export import export_package
from paramcast.common.errors import InvalidInput
from paramcast.common.package import DevicePackage, manifest_digest


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((tiny_package() / "manifest.json").read_text())


@pytest.fixture(scope="module")
def graph() -> onnx.ModelProto:
    return onnx.load(tiny_package() / "model.onnx")


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_model_passes_the_full_onnx_checker(graph):
    onnx.checker.check_model(graph, full_check=True)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_manifest_identifies_model_and_files(manifest):
    ckpt = tiny_checkpoint()
    assert manifest["model_id"] == ckpt.model_id
    assert manifest["base_version"] == ckpt.base_version  # the weights' sha256, as the cloud reports it
    sizes = (manifest["max_len"], manifest["n_items"], manifest["hidden"])
    assert sizes == (TINY.max_len, TINY.n_items, TINY.hidden)
    assert manifest["onnx_opset"] >= 17 and manifest["format_version"] == 1
    data = (tiny_package() / "model.onnx").read_bytes()
    expected = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["files"] == {"model.onnx": expected}
    assert manifest["manifest_sha256"] == manifest_digest(manifest)  # the manifest's digest of itself


def test_graph_inputs_and_outputs_follow_the_contract(graph, manifest):
    inputs = {i.name: i for i in graph.graph.input}
    outputs = {o.name: o for o in graph.graph.output}
    assert _dims(inputs["history"]) == ["batch", TINY.max_len]
    assert _dims(inputs["candidates"]) == ["batch", "candidates"]
    assert inputs["history"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(outputs["scores"]) == ["batch", "candidates"]
    assert _dims(outputs["user_state"]) == ["batch", TINY.hidden]
    assert _dims(outputs["behaviour"]) == ["batch", TINY.hidden]
    assert set(manifest["inputs"]) == {"history", "candidates"}
    assert set(manifest["outputs"]) == set(outputs)


def test_no_graph_input_is_backed_by_an_initializer(graph):
    """ONNX Runtime Web and Mobile neither list nor feed inputs that share a name with an
    initializer: every input must be a plain one."""
    initializers = {t.name for t in graph.graph.initializer}
    assert {i.name for i in graph.graph.input} & initializers == set()
    assert {"head.up.A", "head.up.B", "head.down.A", "head.down.B"} <= {i.name for i in graph.graph.input}


def test_adapter_inputs_are_declared_per_slot(graph, manifest):
    """Each slot's factors are plain inputs (B|1, d_in, r) and (B|1, r, d_out) with a dynamic rank."""
    inputs = {i.name: i for i in graph.graph.input}
    expected = {"head.up": (TINY.hidden, TINY.head_units), "head.down": (TINY.head_units, TINY.hidden),
                "head.cloud": (TINY.hidden + 1, CLOUD_ITEMS)}
    assert {s: (v["d_in"], v["d_out"]) for s, v in manifest["slots"].items()} == expected
    for slot, (d_in, d_out) in expected.items():
        spec = manifest["slots"][slot]
        assert spec["max_rank"] == min(d_in, d_out)  # no generator in this bundle: full rank
        a, b = spec["inputs"]["A"], spec["inputs"]["B"]
        rank = slot.replace(".", "_") + "_rank"
        assert _dims(inputs[a]) == ["adapter_batch", d_in, rank]
        assert _dims(inputs[b]) == ["adapter_batch", rank, d_out]


def test_slicing_plan_names_real_weights_of_the_right_width(graph, manifest):
    shapes = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    model = tiny_checkpoint().device_model
    assert {g: v["n_units"] for g, v in manifest["unit_groups"].items()} == model.unit_groups()
    state = model.state_dict()
    for group in manifest["unit_groups"].values():
        for cut in group["initializers"]:
            assert shapes[cut["name"]] == tuple(state[cut["name"]].shape)  # PyTorch layout, same name
            assert shapes[cut["name"]][cut["axis"]] == group["n_units"]
        inputs = {i.name: _dims(i) for i in graph.graph.input}
        for cut in group["adapter_inputs"]:
            assert inputs[cut["name"]][cut["axis"]] == group["n_units"]


def test_export_command_writes_a_loadable_package_with_a_rank_bound(tmp_path, capsys):
    save_checkpoint(tiny_checkpoint(), tmp_path / "model")
    args = ["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pkg"), "--max-rank", "3"]
    assert cli(args) == 0
    assert "base version " + tiny_checkpoint().base_version in capsys.readouterr().out
    package = DevicePackage.load(tmp_path / "pkg")
    assert {s.max_rank for s in package.slots.values()} == {3}


def test_export_refuses_old_opsets(tmp_path):
    with pytest.raises(InvalidInput, match="opset"):
        export_package(tiny_checkpoint(), tmp_path / "pkg", opset=16)


def test_runs_with_and_without_adapter_in_onnx_runtime_directly():
    """The contract holds for any ONNX Runtime client, not only ours: feed rank-0 factors for the
    base model, or a batch of per-user factors (B, d_in, r) in one run."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_package() / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    history = rng.integers(0, TINY.n_items + 1, (3, TINY.max_len))
    candidates = rng.integers(1, TINY.n_items + 1, (3, 7))
    rank0 = {"head.up.A": np.zeros((1, TINY.hidden, 0), np.float32),
             "head.up.B": np.zeros((1, 0, TINY.head_units), np.float32),
             "head.down.A": np.zeros((1, TINY.head_units, 0), np.float32),
             "head.down.B": np.zeros((1, 0, TINY.hidden), np.float32),
             "head.cloud.A": np.zeros((1, TINY.hidden + 1, 0), np.float32),
             "head.cloud.B": np.zeros((1, 0, CLOUD_ITEMS), np.float32)}
    feeds = {"history": history, "candidates": candidates, **rank0}
    base = session.run(["scores"], feeds)[0]
    with pytest.raises(Exception, match="head"):  # factors are required inputs, never defaulted
        session.run(["scores"], {"history": history, "candidates": candidates})
    a = rng.normal(0, 0.3, (3, TINY.hidden, 2)).astype(np.float32)
    b = rng.normal(0, 0.3, (3, 2, TINY.head_units)).astype(np.float32)
    adapted = session.run(["scores"], {**feeds, "head.up.A": a, "head.up.B": b})[0]
    # Row i with per-user factors equals a batch of one with that user's factors.
    for i in range(3):
        one = session.run(["scores"], {**rank0, "history": history[i:i + 1], "candidates": candidates[i:i + 1],
                                       "head.up.A": a[i:i + 1], "head.up.B": b[i:i + 1]})[0]
        np.testing.assert_allclose(one[0], adapted[i], atol=1e-5)
    assert np.abs(adapted - base).mean() > 1e-2
    zero = session.run(["scores"], {**feeds, "head.up.A": np.zeros_like(a), "head.up.B": b})[0]
    np.testing.assert_allclose(zero, base, atol=1e-5)

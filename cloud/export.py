"""Export the device model to a device package: `model.onnx` + `manifest.json`.

The package is the contract between the cloud and every device (its format: `common/package.py`):

- `model.onnx` scores candidates for a batch of users. Inputs: `history` (B, max_len) int64, item
  ids left-padded with 0; `candidates` (B, C) int64; and per adapter slot `<slot>.A` (B|1, d_in, r)
  and `<slot>.B` (B|1, r, d_out) float32. The factor inputs are plain inputs, never backed by an
  initializer (ONNX Runtime Web and Mobile refuse to feed initializer-backed inputs): every run
  feeds every slot, the base model with rank 0 (shapes (1, d_in, 0) and (1, 0, d_out), so
  x @ A @ B is a zero (B, 1, d_out)), an adapted model with the bundle's factors (W0 + A B);
  swapping an adapter never rebuilds the session.
  Outputs: `scores` (B, C), `user_state` (B, d) (the head's output; the scores are its dot
  products with the item vectors, plus, with a cloud item table, the `head.cloud` slot's map of it
  dotted with the cloud item vectors) and `behaviour` (B, d) (the backbone's last state, before
  the adapted head).
- `items.json` (when the checkpoint records its training data's item ids): the item vocabulary,
  a JSON array whose entry i is the catalogue id of model item i (`common.package.ItemVocabulary`).
- `manifest.json` describes that graph (ids, sizes, input/output names and shapes, slots and their
  maximum rank), names for each unit group the initializers and axes that slimming slices (and
  the factor inputs whose width follows the group), records the size and sha256 of every other
  file, and its own digest (`manifest_sha256`, see `device.package.manifest_digest`).

Weights keep their PyTorch names and layouts inside the graph (`blocks.0.ffn_in.weight` is stored
(f, d) and transposed by a node), so the slicing plan in the manifest is the model's own slicing
rule (`DeviceModel.slimmed`) written down by name and axis.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.model import DeviceModel
from paramcast.common.errors import InvalidInput
from paramcast.common.package import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_DIGEST_KEY,
    MANIFEST_FILE,
    MAPPER_FILE,
    MODEL_FILE,
    POLICY_FILE,
    VOCABULARY_FILE,
    ItemVocabulary,
    manifest_digest,
)

log = logging.getLogger(__name__)

# The torch exporter implements opset 18 natively; lower targets go through the ONNX version
# converter. ONNX Runtime >= 1.17 (the device extra's floor) runs opset 18 models.
DEFAULT_OPSET = 18
MIN_OPSET = 17

INPUTS = ("history", "candidates")
OUTPUTS = ("scores", "user_state", "behaviour")


def factor_inputs(slot: str) -> tuple[str, str]:
    """Graph input names of a slot's factors: ("head.up.A", "head.up.B")."""
    return f"{slot}.A", f"{slot}.B"


class ScoringGraph(nn.Module):
    """What the device runs: DeviceModel.score with every slot's factors as explicit inputs."""

    def __init__(self, model: DeviceModel):
        super().__init__()
        self.model = model
        self.slots = tuple(model.slot_shapes())

    def forward(self, history: torch.Tensor, candidates: torch.Tensor, *factors: torch.Tensor):
        adapters = {slot: (factors[2 * i], factors[2 * i + 1]) for i, slot in enumerate(self.slots)}
        behaviour = self.model.encode(history)[:, -1, :]  # (B, d)
        scores, user = self.model.score_behaviour(behaviour, candidates, adapters)  # (B, C), (B, d)
        return scores, user, behaviour


def slimming_plan(model: DeviceModel) -> dict[str, dict]:
    """Per unit group: the weights `DeviceModel.slimmed` slices (name, axis in the stored layout)
    and the factor inputs whose width is the group's (axis in the (B|1, d_in, r) / (B|1, r, d_out)
    input layout)."""
    plan = {
        "head": {
            "initializers": [
                {"name": "head_up.weight", "axis": 1},  # (d, m)
                {"name": "head_up.bias", "axis": 0},  # (m,)
                {"name": "head_down.weight", "axis": 0},  # (m, d)
            ],
            "adapter_inputs": [
                {"name": factor_inputs("head.up")[1], "axis": 2},  # B (B|1, r, m)
                {"name": factor_inputs("head.down")[0], "axis": 1},  # A (B|1, m, r)
            ],
        }
    }
    for i in range(model.cfg.n_blocks):
        plan[f"block{i}.ffn"] = {
            "initializers": [
                {"name": f"blocks.{i}.ffn_in.weight", "axis": 0},  # (f, d), nn.Linear layout
                {"name": f"blocks.{i}.ffn_in.bias", "axis": 0},  # (f,)
                {"name": f"blocks.{i}.ffn_out.weight", "axis": 1},  # (d, f)
            ],
            "adapter_inputs": [],
        }
    assert set(plan) == set(model.unit_groups()), "every unit group needs a slicing plan"
    return plan


def export_package(
    ckpt: Checkpoint, out: str | Path, opset: int = DEFAULT_OPSET, max_rank: int | None = None,
    item_ids: list[str] | None = None, policy: str | None = None, mapper: str | Path | None = None,
    policy_fitted: dict | None = None,
) -> Path:
    """Write the device package of `ckpt.device_model` to directory `out` and return it.

    `max_rank` bounds the rank of factors a device accepts per slot; by default the generator's
    rank (its config's `rank`) when the checkpoint has one, else full rank min(d_in, d_out).
    `item_ids` is the item vocabulary (entry i: the catalogue id of model item i, entry 0 ""); by
    default the one training recorded in `ckpt.meta["item_raw_ids"]`. Without one the package has
    no vocabulary and devices speak model item ids only. `policy` is the request policy the device
    loop runs (a spec with its threshold calibrated, e.g. from `paramcast simulate`), written to
    `policy.json` with the generator's window length and `policy_fitted` (how it was calibrated);
    `mapper` an IDEAL mapper .npz shipped beside it.
    """
    if opset < MIN_OPSET:
        raise InvalidInput("opset", f"{opset} is below {MIN_OPSET}, the lowest the device runtime supports")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(ckpt.device_model).to("cpu", torch.float32).eval()  # eval: dropout off
    slots = model.slot_shapes()
    ranks = _max_ranks(ckpt, slots, max_rank)

    proto = _export_graph(model, opset)
    proto = _finish_graph(proto, model, slots)
    onnx.checker.check_model(proto, full_check=True)

    model_bytes = proto.SerializeToString()
    _write_atomic(out / MODEL_FILE, model_bytes)
    cfg = model.cfg
    files = {MODEL_FILE: model_bytes}
    item_ids = item_ids if item_ids is not None else ckpt.meta.get("item_raw_ids")
    extra: dict = {}
    if item_ids is not None:
        vocabulary = ItemVocabulary([str(i) for i in item_ids])
        if len(vocabulary) != cfg.n_items:
            raise InvalidInput("item_ids", f"{len(vocabulary)} items, the model has {cfg.n_items}")
        files[VOCABULARY_FILE] = vocabulary.to_json()
        _write_atomic(out / VOCABULARY_FILE, files[VOCABULARY_FILE])
        extra["vocabulary"] = {"file": VOCABULARY_FILE, "size": len(vocabulary)}
    else:
        (out / VOCABULARY_FILE).unlink(missing_ok=True)
    if policy is not None:
        window = getattr(getattr(ckpt.generator, "cfg", None), "window", None)
        files[POLICY_FILE] = (json.dumps({"spec": policy, "window": window, "fitted": policy_fitted or {}},
                                         indent=2) + "\n").encode()
        extra["policy"] = {"file": POLICY_FILE}
        if mapper is not None:
            files[MAPPER_FILE] = Path(mapper).read_bytes()
            extra["policy"]["mapper"] = MAPPER_FILE
    for name in (POLICY_FILE, MAPPER_FILE):
        if name in files:
            _write_atomic(out / name, files[name])
        else:
            (out / name).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": ckpt.model_id,
        "base_version": ckpt.base_version,
        "onnx_opset": _opset_of(proto),
        "max_len": cfg.max_len,
        "n_items": cfg.n_items,
        "hidden": cfg.hidden,
        "device_config": cfg.to_dict(),
        "inputs": {
            "history": {"dtype": "int64", "shape": ["batch", cfg.max_len]},
            "candidates": {"dtype": "int64", "shape": ["batch", "candidates"]},
        },
        "outputs": {
            "scores": {"dtype": "float32", "shape": ["batch", "candidates"]},
            "user_state": {"dtype": "float32", "shape": ["batch", cfg.hidden]},
            "behaviour": {"dtype": "float32", "shape": ["batch", cfg.hidden]},
        },
        "slots": {
            slot: {
                "d_in": d_in,
                "d_out": d_out,
                "max_rank": ranks[slot],
                "inputs": dict(zip(("A", "B"), factor_inputs(slot), strict=True)),
            }
            for slot, (d_in, d_out) in slots.items()
        },
        "unit_groups": {
            group: {"n_units": n, **slimming_plan(model)[group]} for group, n in model.unit_groups().items()
        },
        **extra,
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for name, data in sorted(files.items())},
    }
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    _write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("exported %s (base %s) to %s: %d bytes", ckpt.model_id, ckpt.base_version, out,
             len(model_bytes))
    return out


# -- steps -------------------------------------------------------------------------------------


def _max_ranks(ckpt: Checkpoint, slots: dict[str, tuple[int, int]], max_rank: int | None,
               ) -> dict[str, int]:
    if max_rank is None:
        max_rank = getattr(getattr(ckpt.generator, "cfg", None), "rank", None)
    if max_rank is not None and max_rank < 1:
        raise InvalidInput("max_rank", f"must be at least 1, got {max_rank}")
    full = {slot: min(shape) for slot, shape in slots.items()}
    return {slot: full[slot] if max_rank is None else min(int(max_rank), full[slot]) for slot in slots}


def _export_graph(model: DeviceModel, opset: int) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of ScoringGraph, then constant folding that leaves weights alone."""
    graph = ScoringGraph(model).eval()
    B, C, r = 3, 5, 4  # example sizes; all of them are dynamic in the graph
    slots = model.slot_shapes()
    example: list[torch.Tensor] = [
        torch.randint(0, model.cfg.n_items + 1, (B, model.cfg.max_len)),
        torch.randint(1, model.cfg.n_items + 1, (B, C)),
    ]
    batch, cands = torch.export.Dim("batch"), torch.export.Dim("candidates")
    dynamic: list[dict] = [{0: batch}, {0: batch, 1: cands}]
    names = list(INPUTS)
    for slot, (d_in, d_out) in slots.items():
        rank = torch.export.Dim(slot.replace(".", "_") + "_rank")
        example += [torch.randn(B, d_in, r) * 0.01, torch.randn(B, r, d_out) * 0.01]
        dynamic += [{0: batch, 2: rank}, {0: batch, 1: rank}]  # batch dim is relaxed to B|1 below
        names += factor_inputs(slot)
    # torch.export groups the *factors varargs into one tuple, hence the nested dynamic_shapes.
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph, tuple(example), input_names=names, output_names=list(OUTPUTS),
            dynamic_shapes=(dynamic[0], dynamic[1], tuple(dynamic[2:])), dynamo=True, opset_version=opset,
            optimize=False, verbose=False,
        )
        assert program is not None  # dynamo=True always returns the program
        return _fold_constants(program.model, weights={n for n, _ in graph.named_parameters()})


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's and optimiser's progress chatter (per-node INFO lines, warnings about
    torchvision ops this model does not use); errors still propagate as exceptions."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _fold_constants(ir_model, weights: set[str]) -> onnx.ModelProto:
    """Fold shape arithmetic but never a node reading a weight.

    The exporter's own optimiser folds Transpose(weight) into fresh, renamed initializers and
    merges byte-identical ones (e.g. two zero biases): both would break the slicing plan, which
    addresses weights by name. ONNX Runtime folds those transposes itself when it loads the model.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer
    import onnxscript.rewriter

    def should_fold(node) -> bool | None:
        reads_weight = any(v is not None and v.name in weights and v.is_initializer() for v in node.inputs)
        return False if reads_weight else None  # None: the optimiser's default rule

    for _ in range(2):  # a second round folds what the rewrites of the first exposed
        onnxscript.optimizer.fold_constants(ir_model, should_fold=should_fold)
        onnxscript.rewriter.rewrite(ir_model)
    ir.passes.Sequential(
        passes.IdentityEliminationPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
    )(ir_model)
    return ir.serde.serialize_model(ir_model)


def _finish_graph(proto: onnx.ModelProto, model: DeviceModel, slots: dict[str, tuple[int, int]],
                  ) -> onnx.ModelProto:
    """Weight names without the wrapper prefix, factor inputs declared (B|1, ., .) with no initializer."""
    g = proto.graph
    prefix = "model."
    renames = {t.name: t.name[len(prefix):] for t in g.initializer if t.name.startswith(prefix)}
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for node in g.node:
        node.input[:] = [renames.get(name, name) for name in node.input]

    stored = {t.name: tuple(t.dims) for t in g.initializer}
    for name, p in model.state_dict().items():
        if name in stored and stored[name] != tuple(p.shape):
            raise RuntimeError(f"exported weight {name} has shape {stored[name]}, the model {tuple(p.shape)}")
    for group, spec in slimming_plan(model).items():
        for item in spec["initializers"]:
            if item["name"] not in stored:
                raise RuntimeError(f"unit group {group}: weight {item['name']} is not a graph initializer")

    inputs = {i.name: i for i in g.input}
    for slot, (d_in, d_out) in slots.items():
        a_name, b_name = factor_inputs(slot)
        rank = slot.replace(".", "_") + "_rank"
        declared = (
            (a_name, ("adapter_batch", d_in, rank)),  # A (B|1, d_in, r); the base model feeds r = 0
            (b_name, ("adapter_batch", rank, d_out)),  # B (B|1, r, d_out)
        )
        for name, dims in declared:
            shape = inputs[name].type.tensor_type.shape
            for dim, value in zip(shape.dim, dims, strict=True):
                dim.Clear()
                if isinstance(value, str):
                    dim.dim_param = value
                else:
                    dim.dim_value = value
    shared = {i.name for i in g.input} & {t.name for t in g.initializer}
    if shared:  # the exporter never does this today; a device runtime must be able to feed every input
        raise RuntimeError(f"graph inputs backed by initializers: {sorted(shared)}")

    # Intermediate shapes recorded by the exporter name widths that slimming changes; ONNX Runtime
    # infers them again when it loads the (possibly sliced) graph.
    del g.value_info[:]
    del proto.metadata_props[:]
    for node in g.node:
        del node.metadata_props[:]
    for value in list(g.input) + list(g.output):
        del value.metadata_props[:]
    proto.producer_name = "paramcast"
    return proto


def _opset_of(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees a half-written file

"""Score candidates on the device with ONNX Runtime; apply, revert and slim without torch.

    package = DevicePackage.load("pkg")            # sha256 of every file checked
    rt = DeviceRuntime(package, threads=1)
    rt.score([5, 9, 12], [4, 8, 15])               # one user -> (3,) scores
    rt.apply(bundle)                               # a DeltaBundle: same session, new factor inputs
    rt.revert()                                    # back to the base model

How a bundle is applied: the graph has each adapter slot's factors as plain inputs (see
cloud/export.py). The base model is a run that feeds them with rank 0, A (1, d_in, 0) and
B (1, 0, d_out); an adapted model is a run that feeds the bundle's A (1, d_in, r) and B (1, r, d_out)
(slots the bundle leaves out stay at rank 0). `apply` validates the
factors and swaps one small record holding the feed arrays, so it never builds a session. (ONNX
Runtime's native LoRA API, `RunOptions.add_active_adapter`, needs the factors written to an
adapter file and memory-mapped back for every bundle; tools/bench_device.py measures both.)

Slimming: `slimmed(keep)` builds a session from a copy of the graph whose initializers are sliced
to the kept units (the manifest names tensors and axes), so it is physically smaller. A bundle
that carries masks switches `apply` to the slimmed session for its mask; each distinct mask costs
one session build the first time it is seen (sessions are cached, least recently used evicted)
and a plain swap afterwards. Groups a bundle's masks leave out keep all their units.

Inputs are checked at the boundary: ids must be integers in [0, n_items] (0 is padding), one
user's history is 1-D and its candidates 1-D and non-empty, a batch is a list of histories (or a
2-D array, rows left-padded) with 2-D candidates, one row per history. Histories keep their last
`max_len` items and are left-padded with 0, as in training.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from paramcast.common.bundle import DeltaBundle, check_bundle_for
from paramcast.common.errors import IntegrityError, InvalidInput
from paramcast.common.package import DevicePackage, UnitGroup

# Generated factors are of order 1; finite values far beyond that (a hostile or broken sender) would
# overflow float32 on their way to a score, so apply() refuses them.
MAX_FACTOR_ABS = 1e4

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int = 1, optimization: str = "all") -> ort.SessionOptions:
    """Explicit options: `threads` intra-op threads, no inter-op parallelism, the given graph
    optimisation level, warnings off."""
    if not isinstance(threads, int) or threads < 1:
        raise InvalidInput("threads", f"must be a positive integer, got {threads!r}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise InvalidInput("optimization", f"{optimization!r} is not one of {sorted(OPTIMIZATION_LEVELS)}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    opts.log_severity_level = 3  # errors only
    return opts


# A slimming choice: per group whose units are not all kept, the kept indices (ascending).
Keep = dict[str, np.ndarray]


def _keep_key(keep: Keep | None) -> tuple:
    return tuple(sorted((g, idx.tobytes()) for g, idx in (keep or {}).items()))


@dataclass(frozen=True)
class _Active:
    """What `score` runs: swapped as one reference, so a concurrent call sees old or new, never a mix."""

    session: ort.InferenceSession
    model_nbytes: int  # size of the serialized graph the session was built from
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # every factor input (rank 0 = base)
    bundle_id: str | None = None
    keep: Keep | None = None


class _Sessions:
    """The base session and an LRU cache of slimmed ones, shared by a runtime and its slimmed views."""

    def __init__(self, package: DevicePackage, options: ort.SessionOptions, capacity: int):
        self.package, self.options, self.capacity = package, options, capacity
        self.base = self._build(package.model_bytes)
        self.base_nbytes = len(package.model_bytes)
        self._slim: OrderedDict[tuple, tuple[ort.InferenceSession, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # slimmed sessions built so far (tests and benchmarks read it)

    def _build(self, model: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(model, self.options, providers=["CPUExecutionProvider"])

    def get(self, keep: Keep | None) -> tuple[ort.InferenceSession, int]:
        if not keep:
            return self.base, self.base_nbytes
        key = _keep_key(keep)
        with self._lock:
            if key in self._slim:
                self._slim.move_to_end(key)
                return self._slim[key]
        model = slice_model(self.package, keep)
        built = (self._build(model), len(model))
        with self._lock:
            self.builds += 1
            self._slim[key] = built
            while len(self._slim) > self.capacity:
                self._slim.popitem(last=False)  # runtimes still using it keep their reference
        return built


def slice_model(package: DevicePackage, keep: Keep) -> bytes:
    """The package's graph with every unit group in `keep` cut to its kept indices."""
    from onnx import numpy_helper  # only slimming edits the graph

    proto, tensors = package.graph()
    inputs = {i.name: i for i in proto.graph.input}
    for group, idx in keep.items():
        spec = package.unit_groups[group]
        for cut in spec.initializers:
            kept = np.take(numpy_helper.to_array(tensors[cut.name]), idx, axis=cut.axis)
            tensors[cut.name].CopyFrom(numpy_helper.from_array(kept, cut.name))
        for cut in spec.adapter_inputs:  # the declared width of a factor input follows the group
            inputs[cut.name].type.tensor_type.shape.dim[cut.axis].dim_value = len(idx)
    return proto.SerializeToString()


def rank_zero_feeds(package: DevicePackage) -> dict[str, np.ndarray]:
    """Every slot's factor inputs at rank 0, A (1, d_in, 0) and B (1, 0, d_out): the base model."""
    feeds = {}
    for slot in package.slots.values():
        feeds[slot.a_input] = np.zeros((1, slot.d_in, 0), dtype=np.float32)
        feeds[slot.b_input] = np.zeros((1, 0, slot.d_out), dtype=np.float32)
    return feeds


def check_graph(package: DevicePackage, session: ort.InferenceSession) -> None:
    """Raise IntegrityError unless the graph has the shapes the manifest promises: the history
    length, the hidden width of its outputs, and each slot's factor inputs with their d_in and
    d_out. (A manifest that disagrees with its graph would otherwise load and then fail inside
    ONNX Runtime on every call.)"""
    where = f"{package.path / 'manifest.json'}"
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}

    def expect(kind: str, table: dict, name: str, axis: int, value: int, field: str) -> None:
        shape = table.get(name)
        if shape is None:
            raise IntegrityError(f"{where}: the graph has no {kind} {name!r}")
        got = shape[axis] if len(shape) > axis else None
        if isinstance(got, int) and got != value:
            raise IntegrityError(f"{where}: {field} is {value}, but the graph's {kind} {name!r} has {got} "
                                 f"along axis {axis}")

    expect("input", inputs, "history", 1, package.max_len, "max_len")
    for name in ("user_state", "behaviour"):
        expect("output", outputs, name, 1, package.hidden, "hidden")
    for slot in package.slots.values():
        expect("input", inputs, slot.a_input, 1, slot.d_in, f"slots[{slot.name!r}].d_in")
        expect("input", inputs, slot.b_input, 2, slot.d_out, f"slots[{slot.name!r}].d_out")


class DeviceRuntime:
    """ONNX Runtime inference over a verified device package, with hot-swapped delta bundles."""

    def __init__(self, package: DevicePackage, threads: int = 1, optimization: str = "all",
                 max_slimmed_sessions: int = 4):
        self.package = package
        self.threads, self.optimization = threads, optimization
        self._slots = package.slots
        self._groups = package.unit_groups
        self._sessions = _Sessions(package, session_options(threads, optimization), max_slimmed_sessions)
        check_graph(package, self._sessions.base)
        self._keep: Keep | None = None  # this runtime's own slimming, set by slimmed()
        self._base_feeds = rank_zero_feeds(package)
        self._state = _Active(self._sessions.base, self._sessions.base_nbytes, self._base_feeds)

    # -- what is active ----------------------------------------------------------------------
    @property
    def active_bundle_id(self) -> str | None:
        return self._state.bundle_id

    @property
    def active_keep(self) -> dict[str, np.ndarray]:
        """Per slimmed group, a bool (n_units,) mask of the units the active session keeps."""
        out = {}
        for group, idx in (self._state.keep or {}).items():
            mask = np.zeros(self._groups[group].n_units, dtype=bool)
            mask[idx] = True
            out[group] = mask
        return out

    @property
    def active_session(self) -> ort.InferenceSession:
        return self._state.session

    @property
    def active_model_nbytes(self) -> int:
        """Serialized size of the graph the active session runs (smaller when slimmed)."""
        return self._state.model_nbytes

    @property
    def slimmed_sessions_built(self) -> int:
        return self._sessions.builds

    # -- scoring -----------------------------------------------------------------------------
    def score(self, history, candidates) -> np.ndarray:
        """One user (1-D history, 1-D candidates) -> (C,) float32 scores; a batch (list of
        histories or (B, L) array, (B, C) candidates) -> (B, C)."""
        state = self._state  # one read: a concurrent apply() cannot mix two bundles into this call
        hist, cands, single = self._inputs(history, candidates)
        feeds = {"history": hist, "candidates": cands, **state.feeds}
        scores = state.session.run(["scores"], feeds)[0]  # (B, C)
        return scores[0] if single else scores

    def outputs(self, history, candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One user's scoring run with every output the gates read: (scores (C,), user_state (d,),
        behaviour (d,)), at the cost of one `score` call."""
        state = self._state
        hist, cands, single = self._inputs(history, candidates)
        if not single:
            raise InvalidInput("history", "outputs() takes one user's history")
        scores, user, behaviour = state.session.run(["scores", "user_state", "behaviour"],
                                                    {"history": hist, "candidates": cands, **state.feeds})
        return scores[0], user[0], behaviour[0]

    def behaviour_embedding(self, history) -> np.ndarray:
        """The base backbone's last hidden state: (d,) for one history, (B, d) for a batch.

        It depends on the history only, not on the bundle or slimming in use, so a request policy
        can compare it across time (e.g. now versus when the current bundle was generated).
        """
        single = self._is_single(history)
        hist = self._histories([history] if single else history)  # (B, L)
        cands = np.zeros((len(hist), 1), dtype=np.int64)  # the graph needs some candidates
        feeds = {"history": hist, "candidates": cands, **self._base_feeds}
        state = self._sessions.base.run(["behaviour"], feeds)[0]
        return state[0] if single else state

    def user_state(self, history) -> np.ndarray:
        """The active model's user state (the vector candidates are scored against): (d,) for one
        history, (B, d) for a batch. Unlike `behaviour_embedding` it moves with the bundle."""
        state = self._state
        single = self._is_single(history)
        hist = self._histories([history] if single else history)  # (B, L)
        feeds = {"history": hist, "candidates": np.zeros((len(hist), 1), dtype=np.int64), **state.feeds}
        out = state.session.run(["user_state"], feeds)[0]  # (B, d)
        return out[0] if single else out

    # -- bundles -----------------------------------------------------------------------------
    def apply(self, bundle: DeltaBundle) -> None:
        """Activate a DeltaBundle: its factors as the adapter inputs, its masks (if any) as the
        slimming. Raises VersionMismatch for another model or base version and InvalidInput for
        unknown slots or groups, wrong shapes, ranks above the package's maximum, non-finite
        values or values beyond MAX_FACTOR_ABS; on error the active state is unchanged."""
        check_bundle_for(bundle, self.package.model_id, self.package.base_version)
        feeds = {**self._base_feeds, **self._factor_feeds(bundle.factors)}
        keep = self._keep_from_masks(bundle.masks, "masks") if bundle.masks else self._keep
        session, nbytes = self._sessions.get(keep)
        self._state = _Active(session, nbytes, self._slice_feeds(feeds, keep), bundle.bundle_id, keep)

    def revert(self) -> None:
        """Back to the base model (this runtime's own slimming, if it is a slimmed view)."""
        session, nbytes = self._sessions.get(self._keep)
        self._state = _Active(session, nbytes, self._slice_feeds(self._base_feeds, self._keep), keep=self._keep)

    def sibling(self) -> DeviceRuntime:
        """Another device's runtime over the same package, sharing this one's sessions (factors are
        fed per call, so one graph serves many devices) and starting on the base model."""
        view = object.__new__(DeviceRuntime)
        view.__dict__.update(self.__dict__)
        view.revert()
        return view

    def slimmed(self, keep: Mapping[str, np.ndarray]) -> DeviceRuntime:
        """A runtime over the physically smaller graph that keeps, per unit group, the units whose
        `keep` entry is True (groups left out keep all). It shares this runtime's sessions; bundles
        applied to it are sliced to its units unless they carry masks of their own."""
        view = object.__new__(DeviceRuntime)
        view.__dict__.update(self.__dict__)
        view._keep = self._keep_from_masks(keep, "keep")
        view.revert()
        return view

    # -- boundary checks ---------------------------------------------------------------------
    def _factor_feeds(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        feeds = {}
        for slot_name, (a, b) in factors.items():
            where = f"factors[{slot_name!r}]"
            slot = self._slots.get(slot_name)
            if slot is None:
                raise InvalidInput(where, f"no such adapter slot; the package has {sorted(self._slots)}")
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != slot.d_in or b.shape[1] != slot.d_out \
                    or a.shape[1] != b.shape[0]:
                raise InvalidInput(where, f"expected A ({slot.d_in}, r) and B (r, {slot.d_out}), "
                                          f"got {a.shape} and {b.shape}")
            if a.shape[1] > slot.max_rank:
                raise InvalidInput(where, f"rank {a.shape[1]} exceeds the package's maximum {slot.max_rank}")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise InvalidInput(where, "contains NaN or infinite values")
            largest = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
            if largest > MAX_FACTOR_ABS:
                raise InvalidInput(where, f"a factor value of magnitude {largest:.3g} exceeds {MAX_FACTOR_ABS:g}; "
                                          "scores computed with it could overflow")
            feeds[slot.a_input] = a[None]  # (1, d_in, r): broadcast over the batch
            feeds[slot.b_input] = b[None]  # (1, r, d_out)
        return feeds

    def _slice_feeds(self, feeds: dict[str, np.ndarray], keep: Keep | None) -> dict[str, np.ndarray]:
        """Cut factor inputs to a slimmed graph's widths (the numpy twin of `slice_adapters`)."""
        if not keep:
            return feeds
        out = dict(feeds)
        for group, idx in keep.items():
            for cut in self._groups[group].adapter_inputs:
                if cut.name in out:
                    out[cut.name] = np.ascontiguousarray(np.take(out[cut.name], idx, axis=cut.axis))
        return out

    def _keep_from_masks(self, masks: Mapping[str, np.ndarray], what: str) -> Keep | None:
        keep: Keep = {}
        for group, mask in masks.items():
            where = f"{what}[{group!r}]"
            spec: UnitGroup | None = self._groups.get(group)
            if spec is None:
                raise InvalidInput(where, f"no such unit group; the package has {sorted(self._groups)}")
            mask = np.asarray(mask)
            if mask.shape != (spec.n_units,):
                raise InvalidInput(where, f"expected shape ({spec.n_units},), got {mask.shape}")
            if mask.dtype != bool and not (mask.dtype.kind in "iu" and np.isin(mask, (0, 1)).all()):
                raise InvalidInput(where, f"expected a boolean mask, got {mask.dtype}")
            idx = np.flatnonzero(mask).astype(np.int64)
            if len(idx) < spec.n_units:  # a group keeping every unit needs no slicing
                keep[group] = idx
        return keep or None

    def _is_single(self, history) -> bool:
        if isinstance(history, np.ndarray):
            if history.ndim not in (1, 2):
                raise InvalidInput("history",
                                   f"expected 1-D (one user) or 2-D (a batch), got shape {history.shape}")
            return history.ndim == 1
        if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
            raise InvalidInput("history", f"expected a sequence of item ids, got {type(history).__name__}")
        return len(history) == 0 or not isinstance(history[0], (Sequence, np.ndarray))

    def _inputs(self, history, candidates) -> tuple[np.ndarray, np.ndarray, bool]:
        single = self._is_single(history)
        hist = self._histories([history] if single else history)  # (B, L)
        cands = self._ids(candidates, "candidates", ndim=1 if single else 2)
        if single:
            cands = cands[None]  # (1, C)
        if cands.shape[0] != hist.shape[0]:
            raise InvalidInput("candidates", f"{cands.shape[0]} rows for {hist.shape[0]} histories")
        if cands.shape[1] == 0:
            raise InvalidInput("candidates", "is empty")
        return hist, cands, single

    def _histories(self, histories) -> np.ndarray:
        """Histories (a list of 1-D id sequences or a 2-D array) -> (B, max_len) int64, left-padded."""
        L = self.package.max_len
        if isinstance(histories, np.ndarray):  # rows already aligned; keep the last L columns
            rows = self._ids(histories, "history", ndim=2)[:, -L:]
            if rows.shape[0] == 0:
                raise InvalidInput("history", "the batch is empty")
            out = np.zeros((rows.shape[0], L), dtype=np.int64)
            out[:, L - rows.shape[1]:] = rows
            return out
        if len(histories) == 0:
            raise InvalidInput("history", "the batch is empty")
        out = np.zeros((len(histories), L), dtype=np.int64)
        for i, seq in enumerate(histories):
            tail = self._ids(seq, "history" if len(histories) == 1 else f"history[{i}]", ndim=1)[-L:]
            if len(tail):
                out[i, L - len(tail):] = tail
        return out

    def _ids(self, values, field: str, ndim: int) -> np.ndarray:
        if isinstance(values, np.ndarray):
            arr = values
        else:
            try:
                arr = np.asarray(values)
            except ValueError:  # ragged nesting
                raise InvalidInput(field, "rows have different lengths") from None
            if arr.size == 0 and arr.dtype == np.float64:  # [] parses as float64: an empty id list
                arr = arr.astype(np.int64).reshape(arr.shape)
        if arr.dtype.kind not in "iu":  # bool is kind "b" and is rejected too
            raise InvalidInput(field, f"item ids must be integers, got dtype {arr.dtype}")
        if arr.ndim != ndim:
            raise InvalidInput(field, f"expected a {ndim}-D array of item ids, got shape {arr.shape}")
        if arr.size:
            lo, hi = arr.min(), arr.max()
            if lo < 0 or hi > self.package.n_items:
                bad = lo if lo < 0 else hi
                raise InvalidInput(field, f"item id {bad} is outside [0, {self.package.n_items}]")
        return arr.astype(np.int64, copy=False)

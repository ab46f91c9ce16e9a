"""Side-by-side evaluation of a checkpoint's variants under the SASRec protocol.

A variant names which parameters score each case:
- `static`           the device model alone;
- `cloud`            the cloud model on the whole history: every interaction served by the cloud;
- `oracle`           a delta of the generator's shape fitted per history against the cloud model
                     (cloud/oracle.py): what the delta format could carry with a perfect generator;
- `generated`        a delta generated from the window ending at the evaluation point;
- `refined@<steps>`  the generated delta refined by <steps> steps against the cloud model
                     (GeneratorConfig.refine_steps; `generated` uses the generator's own);
- `slimmed@<keep>`   the generated delta plus the generated subnet at keep ratio <keep>;
- `stale@<k>`        the delta generated k interactions before the evaluation point (none, i.e.
                     the base model, for a history that was empty then);
- `int8` / `fp16`    the generated delta after that wire encoding and back.
Every variant is scored on the same users with the same sampled negatives, so per-user
differences are paired. `protocol` picks the sampled protocol, full-catalogue ranking, or both
(common/evaluation.py); full-ranking metrics are named `full:<metric>`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from paramcast.cloud.bundles import generate_parameters
from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.model import left_pad
from paramcast.cloud.oracle import cloud_log_probs, fit_oracle
from paramcast.common.bundle import dequantize, quantize
from paramcast.common.evaluation import (
    PROTOCOLS,
    LeaveOneOut,
    full_ranking_metrics,
    gap_closed,
    metrics_from_scores,
    paired_difference,
    sample_negatives,
    summarize,
)
from paramcast.common.interactions import InteractionLog

DEFAULT_VARIANTS = ("static", "generated", "cloud", "slimmed@0.25", "slimmed@0.5", "slimmed@0.75",
                    "stale@1", "stale@5", "stale@20", "int8")
_NEGATIVES: dict[tuple, np.ndarray] = {}


def negatives_for(data: InteractionLog, users: np.ndarray, stage: str, seed: int = 0, n: int = 100) -> np.ndarray:
    """Sampled negatives, cached per (data, users, stage, seed): every variant and epoch sees the same."""
    key = (id(data), hashlib.sha1(users.tobytes()).hexdigest(), stage, seed, n)
    if key not in _NEGATIVES:
        stage_seed = seed * 2 + (1 if stage == "test" else 0)  # validation and test draw different items
        _NEGATIVES[key] = sample_negatives(data, users, n=n, seed=stage_seed)
    return _NEGATIVES[key]


def _parse(variant: str) -> tuple[str, float | int | str | None]:
    if variant.startswith("slimmed@"):
        return "slimmed", float(variant.split("@", 1)[1])
    if variant.startswith("stale@"):
        return "stale", int(variant.split("@", 1)[1])
    if variant.startswith("refined@"):
        return "refined", int(variant.split("@", 1)[1])
    if variant in ("int8", "fp16", "fp32"):
        return "encoded", variant
    if variant in ("static", "generated", "cloud", "oracle"):
        return variant, None
    raise ValueError(f"unknown variant {variant!r}; known: static, generated, cloud, oracle, refined@K, slimmed@K, "
                     "stale@K, int8, fp16")


def _encoded(adapters, encoding: str):
    """Round-trip every device's factors through the wire encoding (per-row int8 scales etc.)."""
    out = {}
    for slot, (a, b) in adapters.items():
        a_np, b_np = a.cpu().numpy(), b.cpu().numpy()
        a_q = np.stack([dequantize(quantize(x, encoding)) for x in a_np])
        b_q = np.stack([dequantize(quantize(x, encoding)) for x in b_np])
        out[slot] = (torch.from_numpy(a_q), torch.from_numpy(b_q))
    return out


def item_table(ckpt: Checkpoint, variant: str) -> torch.Tensor:
    """(n_items + 1, d) the item vectors `variant`'s user vectors are scored against."""
    if variant == "cloud":
        if ckpt.cloud_model is None:
            raise ValueError(f"model {ckpt.model_id} has no cloud model; train it with the cloud stage")
        return ckpt.cloud_model.output_table().detach()
    return ckpt.device_model.output_table().detach()


@torch.no_grad()
def user_vectors(ckpt: Checkpoint, histories: Sequence[np.ndarray], variant: str, batch: int = 1024,
                 profiles: torch.Tensor | None = None) -> torch.Tensor:
    """(U, d) user state after each history under `variant`: what every protocol scores items with
    (against `item_table(ckpt, variant)`). `profiles` (U, F): the users' profiles, for a cloud
    model that reads user features (CloudModel.profiles)."""
    kind, arg = _parse(variant)
    model = ckpt.device_model.eval()
    L = model.cfg.max_len
    cloud = ckpt.cloud_model
    if kind in ("cloud", "oracle") and cloud is None:
        raise ValueError(f"model {ckpt.model_id} has no cloud model; train it with the cloud stage")
    if kind not in ("cloud", "static") and cloud is not None and cloud.cfg.user_features:
        raise ValueError(f"variant {variant!r} distils the cloud model from a history alone, and model "
                         f"{ckpt.model_id}'s cloud model reads user features too: only static and cloud apply")
    if kind == "cloud":
        assert cloud is not None
        cloud.eval()
        out = torch.empty(len(histories), cloud.cfg.hidden)
        for start in range(0, len(histories), batch):
            hist = list(histories[start:start + batch])
            profile = profiles[start:start + len(hist)] if profiles is not None else None
            out[start:start + len(hist)] = cloud.encode(left_pad(hist, cloud.cfg.max_len, trim=True), profile)[:, -1]
        return out
    out = torch.empty(len(histories), model.user_dim)
    # Encode in order of history length so each chunk pads only to its own longest history.
    order = np.argsort([len(h) for h in histories], kind="stable")
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        hist = [histories[i] for i in rows]
        adapters, masks = None, None
        if kind == "oracle":
            rank = ckpt.generator.cfg.rank if ckpt.generator is not None else 4
            assert cloud is not None
            with torch.enable_grad():
                adapters = fit_oracle(model, left_pad(hist, L, trim=True), cloud_log_probs(cloud, hist),
                                      list(model.slot_shapes()), rank)
        elif kind != "static":
            back = int(arg) if kind == "stale" else 0  # type: ignore[arg-type]
            windows = [h[: max(0, len(h) - back)] for h in hist]
            keep = float(arg) if kind == "slimmed" else None  # type: ignore[arg-type]
            refine = int(arg) if kind == "refined" else None  # type: ignore[arg-type]
            adapters, masks = generate_parameters(ckpt, windows, keep, refine_steps=refine)
            if kind == "stale":
                # k interactions ago a shorter history was empty: the device held no bundle yet and
                # scores with the base model, as a device does before its first request.
                held = torch.tensor([len(w) > 0 for w in windows], dtype=torch.float32)[:, None, None]
                adapters = {slot: (a, b * held) for slot, (a, b) in adapters.items()}
            if kind == "encoded":
                adapters = _encoded(adapters, str(arg))
        out[torch.as_tensor(rows)] = model.user_states(left_pad(hist, L, trim=True), adapters, masks)[:, -1, :]
    return out


def per_user_metrics(ckpt: Checkpoint, data: InteractionLog, users: np.ndarray, stage: str,
                     variants: Sequence[str], seed: int = 0,
                     protocol: str = "sampled") -> dict[str, dict[str, np.ndarray]]:
    """{variant: {metric: (U,) per-user values}} for the evaluation users among `users`.

    `protocol`: `sampled` ranks the target among 100 sampled negatives, `full` against the whole
    catalogue minus the user's other items (metrics named `full:*`), `both` reports both from the
    same user vectors."""
    split = LeaveOneOut.of(data, users)
    histories = [split.case(int(u), stage)[0] for u in split.eval_users()]
    cloud = ckpt.cloud_model
    profiles = cloud.profiles(data.user_features, split.eval_users()) if cloud is not None else None
    return {v: _vector_metrics(user_vectors(ckpt, histories, v, profiles=profiles), item_table(ckpt, v), data,
                               split, stage, seed, protocol) for v in variants}


def popularity_metrics(data: InteractionLog, users: np.ndarray, stage: str, seed: int = 0,
                       protocol: str = "sampled") -> dict[str, np.ndarray]:
    """The same metrics for a model-free baseline: every user gets the items most often seen in training.

    A yardstick for how hard a split is: when the test targets are rarer in training than the
    validation ones, this baseline (and any model trained on the same split) scores lower on test."""
    split = LeaveOneOut.of(data, users)
    counts = np.bincount(np.concatenate([split.train_sequence(int(u)) for u in range(data.n_users)]),
                         minlength=data.n_items + 1).astype(np.float32)
    table = torch.from_numpy(counts)[:, None]  # (n_items + 1, 1): a one-dimensional "embedding"
    vectors = torch.ones(len(split.eval_users()), 1)
    return _vector_metrics(vectors, table, data, split, stage, seed, protocol)


def _vector_metrics(vectors: torch.Tensor, table: torch.Tensor, data: InteractionLog, split: LeaveOneOut, stage: str,
                    seed: int, protocol: str) -> dict[str, np.ndarray]:
    """Per-user metrics of scores `vectors @ table.T` (users (U, d), items (n_items + 1, d)) under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    eval_users = split.eval_users()
    targets = np.array([split.case(int(u), stage)[1] for u in eval_users], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    if protocol in ("sampled", "both"):
        cand = torch.as_tensor(np.concatenate([targets[:, None], negatives_for(data, eval_users, stage, seed)], 1))
        out.update(metrics_from_scores(torch.einsum("ucd,ud->uc", table[cand], vectors).numpy()))
    if protocol in ("full", "both"):
        chunk = max(1, 2**23 // len(table))  # (chunk, n_items + 1) float32 scores: ~32 MiB at a time
        parts: dict[str, list] = {}
        for start in range(0, len(eval_users), chunk):
            rows = slice(start, start + chunk)
            scores = (vectors[rows] @ table.T).numpy()  # (chunk, n_items + 1)
            exclude = [data.sequences[int(u)] for u in eval_users[rows]]
            for m, vals in full_ranking_metrics(scores, targets[rows], exclude).items():
                parts.setdefault(m, []).append(vals)
        out.update({m: np.concatenate(vals) for m, vals in parts.items()})
    return out


STAGES = ("test", "valid", "held-out")


def _supports(ckpt: Checkpoint, variant: str) -> bool:
    """Whether `ckpt` has what `variant` needs: every model scores static, the cloud variant needs
    the cloud model, every other variant the generator."""
    if variant == "static":
        return True
    return ckpt.cloud_model is not None if variant == "cloud" else ckpt.generator is not None


def evaluate(ckpt: Checkpoint, data: InteractionLog, variants: Sequence[str] | None = None,
             stage: str = "test", seed: int = 0, protocol: str = "sampled", against: Checkpoint | None = None) -> dict:
    """The `paramcast evaluate --json` document: variant -> metric -> {value, ci}, plus paired diffs.

    `stage`: the test cases, the validation cases, or `held-out`: the validation cases of the warm
    users that early stopping did not score (a model trained with --valid-users N below the number
    of validation users), unbiased by the training's own choice of epochs. `against`: a second
    model trained on the same data and split; each warm variant both have gains "<variant>-against",
    this model minus that one, paired over the same users, cases and negatives."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    from paramcast.common.errors import InvalidInput

    for model in (ckpt,) if against is None else (ckpt, against):
        if data.n_items != model.device_model.cfg.n_items:
            raise InvalidInput("data", f"has {data.n_items} items but model {model.model_id} was trained on "
                                       f"{model.device_model.cfg.n_items}; evaluate on the data it was trained on")
    if variants is None:
        variants = tuple(v for v in DEFAULT_VARIANTS if _supports(ckpt, v))
    cold_raw = set(ckpt.meta.get("split", {}).get("cold_users", []))
    if against is not None and set(against.meta.get("split", {}).get("cold_users", [])) != cold_raw:
        raise InvalidInput("against", f"model {against.model_id} held out other cold users than {ckpt.model_id}; "
                                      "paired comparisons need the same split (train both with the same seed)")
    is_cold = np.array([u in cold_raw for u in data.user_raw_ids])
    warm, cold = np.nonzero(~is_cold)[0], np.nonzero(is_cold)[0]
    if stage == "held-out":
        from paramcast.cloud.train import early_stopping_users

        config = ckpt.meta.get("train_config", {})
        eval_users = LeaveOneOut.of(data, warm).eval_users()
        scored = early_stopping_users(eval_users, int(config.get("valid_users", 0)), int(config.get("seed", 0)))
        warm = np.setdiff1d(eval_users, scored)
        if not len(warm):
            raise InvalidInput("stage", f"model {ckpt.model_id}: early stopping scored every validation user; "
                                        "train it with --valid-users below their number to hold some out")
        stage, cold = "valid", cold[:0]  # cold users never trained anything: their validation is never biased
    report: dict = {}
    warm_metrics = per_user_metrics(ckpt, data, warm, stage, variants, seed, protocol)
    for v, m in warm_metrics.items():
        report[v] = summarize(m, seed=seed)
    for v in list(warm_metrics):  # what a delta, the cloud, or a delta k interactions old adds to the device
        if "static" in warm_metrics and (v in ("generated", "cloud") or v.startswith(("stale@", "refined@"))):
            report[f"{v}-static"] = paired_difference(warm_metrics[v], warm_metrics["static"], seed)
        if "generated" in warm_metrics and v.startswith("refined@"):
            report[f"{v}-generated"] = paired_difference(warm_metrics[v], warm_metrics["generated"], seed)
    if against is not None:
        both = [v for v in warm_metrics if _supports(against, v)]
        against_metrics = per_user_metrics(against, data, warm, stage, both, seed, protocol)
        for v, m in against_metrics.items():
            report[f"{v}-against"] = paired_difference(warm_metrics[v], m, seed)
    if "cloud" in warm_metrics and "generated" in warm_metrics:
        report["gap_closed"] = gap_closed(warm_metrics["generated"], warm_metrics["static"], warm_metrics["cloud"],
                                          seed=seed)
    if len(cold):
        cold_variants = [v for v in ("static", "generated", "cloud") if v in variants]
        cold_metrics = per_user_metrics(ckpt, data, cold, stage, cold_variants, seed, protocol)
        for v, m in cold_metrics.items():
            report[f"cold:{v}"] = summarize(m, seed=seed)
        if "generated" in cold_metrics:
            report["cold:generated-static"] = paired_difference(cold_metrics["generated"], cold_metrics["static"],
                                                                seed)
    return report

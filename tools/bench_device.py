"""Device benchmark: ONNX Runtime scoring latency, bundle apply time, package size, resident memory,
and PyTorch eager on the same CPU in the same run.

    python tools/bench_device.py --model runs/ml-100k          # a trained checkpoint
    python tools/bench_device.py                               # a randomly initialised default model

Writes benchmarks/results/device-latency.json and prints a Markdown summary. Latency does not
depend on the weights, so the default model (DeviceModelConfig defaults sized for MovieLens 100K)
measures the same graph as a trained one; with `--model` the bundles come from its generator.

What is timed (wall clock of one call, `--threads` intra-op threads on both sides):
- `DeviceRuntime.score` for 1 user x 101 candidates and 64 users x 101, for the base model, an
  applied bundle, slimmed@0.5 (`slimmed()` view) and a bundle carrying 0.5 masks;
- PyTorch eager (`torch.inference_mode`) on the very module that was exported (`ScoringGraph`,
  which scores only the last position, like the graph), for base and adapted;
- `DeviceRuntime.apply` of an already decoded bundle (the session is reused), decode + apply from
  bytes, and the first apply of a bundle with a mask not seen before (builds a slimmed session);
- ONNX Runtime's native LoRA API on the same graph: building and loading an adapter file per
  bundle, and scoring with `RunOptions.add_active_adapter`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from paramcast.cloud.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from paramcast.cloud.export import ScoringGraph, export_package  # noqa: E402
from paramcast.cloud.model import DeviceModel, DeviceModelConfig, left_pad  # noqa: E402
from paramcast.common.bundle import DeltaBundle  # noqa: E402
from paramcast.common.package import DevicePackage  # noqa: E402
from paramcast.common.serde import decode_bundle, encode_bundle  # noqa: E402
from paramcast.device.runtime import DeviceRuntime, session_options  # noqa: E402

N_CANDIDATES = 101
BATCH = 64
KEEP_RATIO = 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="trained checkpoint directory (default: random-init default model)")
    p.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "ml-100k"),
                   help="interaction data for real histories (random histories if absent)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "device-latency.json"))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for ONNX Runtime and torch")
    p.add_argument("--iters", type=int, default=400, help="timed calls per 1-user case")
    p.add_argument("--batch-iters", type=int, default=60, help="timed calls per 64-user case")
    p.add_argument("--rank", type=int, default=4, help="factor rank when the model has no generator")
    p.add_argument("--encoding", default="int8", choices=("int8", "fp16", "fp32"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    ckpt = load_checkpoint(args.model) if args.model else default_bundle(args.data)
    model = ckpt.device_model.eval()
    users = sample_users(args.data, model.cfg.n_items, BATCH, rng)
    work = Path(tempfile.mkdtemp(prefix="paramcast-bench-"))
    t0 = time.perf_counter()
    package = DevicePackage.load(export_package(ckpt, work / "pkg"))
    export_s = time.perf_counter() - t0

    plain, masked = make_bundles(ckpt, users[0][0], args.rank, rng)
    wire_plain, wire_masked = encode_bundle(plain, args.encoding), encode_bundle(masked, args.encoding)
    plain, masked = decode_bundle(wire_plain), decode_bundle(wire_masked)  # what a device holds
    keep = masked.masks

    rt = DeviceRuntime(package, threads=args.threads)
    slim = rt.slimmed(keep)
    one = users[:1]
    cases = {
        "base": (rt, None),
        "adapted": (rt, plain),
        f"slimmed_{KEEP_RATIO}": (slim, None),
        f"adapted_slimmed_{KEEP_RATIO}": (rt, masked),
    }
    latency: dict[str, dict] = {}
    max_diff = 0.0
    for name, (runtime, delta) in cases.items():
        if delta is None:
            runtime.revert()
        else:
            runtime.apply(delta)
        latency[name] = {}
        for label, batch, iters in (("1x101", one, args.iters), (f"{BATCH}x101", users, args.batch_iters)):
            hists, cands = [h for h, _ in batch], np.stack([c for _, c in batch])
            hist: list[np.ndarray] | np.ndarray = hists
            if len(batch) == 1:
                hist, cands = hists[0], cands[0]  # the one-user call path
            latency[name][label] = timed(lambda r=runtime, h=hist, c=cands: r.score(h, c), iters)
        got = runtime.score([h for h, _ in users], np.stack([c for _, c in users]))
        want = torch_scores(model, users, delta, keep if name.startswith("slimmed") else None)
        max_diff = max(max_diff, float(np.abs(got - want).max()))
    rt.revert()

    torch_latency = {
        name: {
            "1x101": timed(torch_scorer(model, one, delta), args.iters),
            f"{BATCH}x101": timed(torch_scorer(model, users, delta), args.batch_iters),
        }
        for name, delta in (("base", None), ("adapted", plain))
    }
    speedup = {label: torch_latency["base"][label]["p50_ms"] / latency["base"][label]["p50_ms"]
               for label in latency["base"]}

    apply = apply_timings(package, args.threads, plain, wire_plain, masked, args.iters)
    native = native_lora(package, args.threads, plain, one[0], work, args.iters)
    native["score_1x101_graph_inputs"] = latency["adapted"]["1x101"]
    native["apply_graph_inputs"] = apply["apply_decoded"]
    native["choice"] = "graph inputs (apply swaps numpy feeds; the native API needs an adapter file per bundle)"

    slim_bytes = slim.active_model_nbytes
    base_bytes = rt.active_model_nbytes
    result = {
        "benchmark": "device",
        "model": args.model or "random-init default DeviceModelConfig",
        "model_id": package.model_id,
        "base_version": package.base_version,
        "device_config": model.cfg.to_dict(),
        "machine": machine(),
        "threads": args.threads,
        "encoding": args.encoding,
        "factor_rank": int(next(iter(plain.factors.values()))[0].shape[1]),
        "export_seconds": round(export_s, 2),
        "package_bytes": package.size_bytes(),
        "model_onnx_bytes": base_bytes,
        f"slimmed_{KEEP_RATIO}_model_onnx_bytes": slim_bytes,
        "slimmed_size_ratio": slim_bytes / base_bytes,
        "slimmed_latency_ratio": {label: latency[f"slimmed_{KEEP_RATIO}"][label]["p50_ms"]
                                  / latency["base"][label]["p50_ms"] for label in latency["base"]},
        "bundle_wire_bytes": {"plain": len(wire_plain), "with_masks": len(wire_masked)},
        "latency_ms": latency,
        "torch_eager_latency_ms": torch_latency,
        "ort_vs_torch_speedup": speedup["1x101"],
        "ort_vs_torch_speedup_by_batch": speedup,
        "max_abs_diff_ort_vs_torch": max_diff,
        "apply_ms": apply,
        "adapter_mechanism": native,
        "memory": resident_memory(package.path, args.threads, keep),
        "wall_seconds": None,
    }
    result["wall_seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"\nwrote {out}")
    return 0


# -- inputs --------------------------------------------------------------------------------------


def default_bundle(data: str) -> Checkpoint:
    torch.manual_seed(0)
    n_items = _n_items(data) or 1682  # MovieLens 100K's catalogue when the data is absent
    return Checkpoint("bench-random-init", DeviceModel(DeviceModelConfig(n_items=n_items)).eval())


def _n_items(data: str) -> int | None:
    if not Path(data).exists():
        return None
    from paramcast.common.data import load_interactions

    return load_interactions(data).n_items


def sample_users(data: str, n_items: int, n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` (history, 101 candidates) pairs: real users' histories when the data matches the model's
    catalogue, else random ones; candidates are the next item plus uniform negatives."""
    sequences = None
    if Path(data).exists():
        from paramcast.common.data import load_interactions

        log = load_interactions(data)
        if log.n_items == n_items:
            sequences = [log.sequences[u] for u in rng.choice(log.n_users, n, replace=False)]
    if sequences is None:
        sequences = [rng.integers(1, n_items + 1, int(rng.integers(5, 200))) for _ in range(n)]
    return [(s[:-1].astype(np.int64), np.concatenate([s[-1:], rng.integers(1, n_items + 1, N_CANDIDATES - 1)]))
            for s in sequences]


def make_bundles(ckpt: Checkpoint, window: np.ndarray, rank: int, rng: np.random.Generator):
    """A bundle without masks and one with masks at KEEP_RATIO: from the generator when there is
    one, else random factors of `rank` and random masks."""
    if ckpt.generator is not None:
        from paramcast.cloud.bundles import generate_bundles

        plain = generate_bundles(ckpt, [window])[0]
        masked = generate_bundles(ckpt, [window], keep_ratio=KEEP_RATIO)[0]
        return plain, masked
    model = ckpt.device_model
    factors = {slot: (rng.normal(0, 0.05, (d_in, rank)), rng.normal(0, 0.05, (rank, d_out)))
               for slot, (d_in, d_out) in model.slot_shapes().items()}
    masks = {}
    for group, n in model.unit_groups().items():
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, round(KEEP_RATIO * n), replace=False)] = True
        masks[group] = mask
    plain = DeltaBundle(ckpt.model_id, ckpt.base_version, factors)
    return plain, DeltaBundle(ckpt.model_id, ckpt.base_version, factors, masks)


# -- timing --------------------------------------------------------------------------------------


def timed(fn, iters: int, warmup: int | None = None) -> dict:
    for _ in range(warmup if warmup is not None else max(3, iters // 10)):
        fn()
    times = np.empty(iters)
    for i in range(iters):
        t = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t
    ms = times / 1e6
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": iters}


def _torch_factors(delta: DeltaBundle | None):
    if delta is None:
        return None
    return {s: (torch.from_numpy(a)[None], torch.from_numpy(b)[None]) for s, (a, b) in delta.factors.items()}


def torch_scorer(model: DeviceModel, users, delta: DeltaBundle | None):
    """PyTorch eager on the exported module (same computation as the graph), inputs prepared once."""
    graph = ScoringGraph(model).eval()
    history = left_pad([h for h, _ in users], model.cfg.max_len)  # (B, L)
    candidates = torch.from_numpy(np.stack([c for _, c in users]))  # (B, C)
    adapters = _torch_factors(delta) or {
        slot: (torch.zeros(1, d_in, 0), torch.zeros(1, 0, d_out)) for slot, (d_in, d_out) in model.slot_shapes().items()
    }
    factors = [t for slot in graph.slots for t in adapters[slot]]

    def run():
        with torch.inference_mode():
            return graph(history, candidates, *factors)[0]

    return run


def torch_scores(model: DeviceModel, users, delta: DeltaBundle | None, keep) -> np.ndarray:
    from paramcast.cloud.model import slice_adapters

    history = left_pad([h for h, _ in users], model.cfg.max_len)
    candidates = torch.from_numpy(np.stack([c for _, c in users]))
    adapters = _torch_factors(delta)
    masks = (delta.masks if delta is not None and delta.masks else keep) or None
    with torch.inference_mode():
        if masks:
            keep_t = {g: torch.from_numpy(m) for g, m in masks.items()}
            model = model.slimmed(keep_t)
            adapters = slice_adapters(adapters, keep_t) if adapters else None
        return model.score(history, candidates, adapters).numpy()


def apply_timings(package: DevicePackage, threads: int, plain: DeltaBundle, wire: bytes,
                  masked: DeltaBundle, iters: int) -> dict:
    rt = DeviceRuntime(package, threads=threads)
    other = DeltaBundle(plain.model_id, plain.base_version, {s: (a * 0.5, b) for s, (a, b) in plain.factors.items()})
    flip = [plain, other]  # alternate two bundles so every call really swaps
    counter = iter(range(10**9))
    decoded = timed(lambda: rt.apply(flip[next(counter) % 2]), iters)
    from_bytes = timed(lambda: rt.apply(decode_bundle(wire)), iters)
    firsts = []
    for _ in range(5):  # a mask never seen: builds and caches a slimmed session
        fresh = DeviceRuntime(package, threads=threads)
        t = time.perf_counter_ns()
        fresh.apply(masked)
        firsts.append((time.perf_counter_ns() - t) / 1e6)
    cached = timed(lambda: rt.apply(masked), iters)
    return {
        "apply_decoded": decoded,
        "decode_and_apply": from_bytes,
        "apply_new_mask_first_time_ms": float(np.median(firsts)),
        "apply_cached_mask": cached,
        "target_ms": 1.0,
        "meets_target": decoded["p99_ms"] < 1.0,
    }


def native_lora(package: DevicePackage, threads: int, delta: DeltaBundle, user, work: Path, iters: int) -> dict:
    """ONNX Runtime's LoRA adapter API on the same graph: the factors go into an adapter file that
    is memory-mapped and activated per run through RunOptions."""
    session = ort.InferenceSession(package.model_bytes, session_options(threads), providers=["CPUExecutionProvider"])
    params = {}
    for slot in package.slots.values():
        a, b = delta.factors[slot.name]
        params[slot.a_input], params[slot.b_input] = a[None].copy(), b[None].copy()
    path = str(work / "bundle.onnx_adapter")
    holder: dict = {}

    def apply():
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        fmt.export_adapter(path)
        adapter = ort.LoraAdapter()
        adapter.Load(path)
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        holder["adapter"], holder["options"] = adapter, options  # the adapter must outlive the runs

    apply_ms = timed(apply, max(20, iters // 4))
    tail = user[0][-package.max_len:]
    history = np.zeros((1, package.max_len), dtype=np.int64)  # left-padded, as the runtime feeds it
    history[0, package.max_len - len(tail):] = tail
    feeds = {"history": history, "candidates": user[1][None]}
    rt = DeviceRuntime(package, threads=threads)
    score = timed(lambda: session.run(["scores"], feeds, run_options=holder["options"]), iters)
    rt.apply(delta)
    same = np.abs(session.run(["scores"], feeds, run_options=holder["options"])[0][0] - rt.score(*user)).max()
    return {"apply_native_lora": apply_ms, "score_1x101_native_lora": score,
            "max_abs_diff_native_vs_inputs": float(same)}


def resident_memory(package: Path, threads: int, keep: dict) -> dict:
    """RSS of a fresh process: after importing the runtime, after loading the package and scoring,
    and after also building the slimmed@0.5 session. Linux /proc; torch is never imported there."""
    masks = {g: m.tolist() for g, m in keep.items()}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        def rss_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        from paramcast.common.package import DevicePackage
        from paramcast.device.runtime import DeviceRuntime
        imported = rss_mb()
        rt = DeviceRuntime(DevicePackage.load({str(package)!r}), threads={threads})
        rt.score([1, 2, 3], list(range(1, 102)))
        loaded = rss_mb()
        rt.slimmed({masks!r}).score([1, 2, 3], list(range(1, 102)))
        slimmed = rss_mb()
        print(json.dumps({{"rss_after_imports_mb": imported, "rss_package_loaded_mb": loaded,
                          "rss_with_slimmed_session_mb": slimmed, "package_delta_mb": loaded - imported,
                          "torch_imported": "torch" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "torch": torch.__version__}


def summary(r: dict) -> str:
    lines = [f"Device benchmark: {r['model']} ({r['machine']['cpu']}, {r['threads']} thread(s))", "",
             "| case | 1x101 p50 / p99 ms | 64x101 p50 / p99 ms |", "|---|---|---|"]
    for name, row in r["latency_ms"].items():
        lines.append(f"| ORT {name} | {row['1x101']['p50_ms']:.3f} / {row['1x101']['p99_ms']:.3f} | "
                     f"{row['64x101']['p50_ms']:.2f} / {row['64x101']['p99_ms']:.2f} |")
    for name, row in r["torch_eager_latency_ms"].items():
        lines.append(f"| torch eager {name} | {row['1x101']['p50_ms']:.3f} / {row['1x101']['p99_ms']:.3f} | "
                     f"{row['64x101']['p50_ms']:.2f} / {row['64x101']['p99_ms']:.2f} |")
    a, n, m = r["apply_ms"], r["adapter_mechanism"], r["memory"]
    lines += [
        "",
        f"- ORT vs torch eager speedup (p50): 1 user {r['ort_vs_torch_speedup']:.2f}x, "
        f"64 users {r['ort_vs_torch_speedup_by_batch']['64x101']:.2f}x; "
        f"max |ORT - torch| {r['max_abs_diff_ort_vs_torch']:.2e}",
        f"- apply a decoded bundle: p50 {a['apply_decoded']['p50_ms'] * 1000:.0f} us, p99 "
        f"{a['apply_decoded']['p99_ms'] * 1000:.0f} us; decode + apply "
        f"{a['decode_and_apply']['p50_ms'] * 1000:.0f} us; first bundle with a new mask "
        f"{a['apply_new_mask_first_time_ms']:.1f} ms (builds a slimmed session)",
        f"- native LoRA API: apply {n['apply_native_lora']['p50_ms'] * 1000:.0f} us, score 1x101 "
        f"{n['score_1x101_native_lora']['p50_ms']:.3f} ms vs graph inputs "
        f"{n['score_1x101_graph_inputs']['p50_ms']:.3f} ms",
        f"- package {r['package_bytes']:,} bytes; slimmed@0.5 graph {r['slimmed_size_ratio']:.2f}x the size, "
        f"latency {r['slimmed_latency_ratio']['1x101']:.2f}x (1 user), "
        f"{r['slimmed_latency_ratio']['64x101']:.2f}x (64 users)",
    ]
    if "rss_package_loaded_mb" in m:
        lines.append(f"- RSS of a device process holding the package: {m['rss_package_loaded_mb']:.1f} MB "
                     f"({m['package_delta_mb']:.1f} MB above the imported runtime)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

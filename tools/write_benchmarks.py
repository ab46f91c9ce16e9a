"""Render BENCHMARKS.md from benchmarks/results/*.json, so every figure in it comes from a result file.

    python tools/write_benchmarks.py            # rewrites BENCHMARKS.md

Each section names the command that produced its file. Commentary that interprets the numbers
(what falls short and why) lives in benchmarks/notes/<section>.md and is included verbatim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTES = ROOT / "benchmarks" / "notes"
METRICS = ("hr@10", "ndcg@10", "auc")
FULL_METRICS = ("full:hr@10", "full:ndcg@10")


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def note(section: str) -> str:
    path = NOTES / f"{section}.md"
    return "\n" + path.read_text().strip() + "\n" if path.exists() else ""


def cell(m: dict, digits: int = 4) -> str:
    lo, hi = m["ci"]
    return f"{m['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def quality_section(doc: dict) -> str:
    meta = doc["meta"]
    name = meta["dataset"]
    out = [f"### {name}", "", f"Command: `{meta['command']}`", ""]
    # Full-catalogue columns where the report has them (`paramcast evaluate --protocol both`).
    metrics = METRICS + tuple(m for m in FULL_METRICS if m in doc.get("static", {}))
    out.append("| variant | " + " | ".join(f"{m} [95% CI]" for m in metrics) + " |")
    out.append("|---|" + "---|" * len(metrics))
    for variant, ms in doc.items():
        if variant in ("seeds", "meta", "sizes") or not isinstance(ms, dict) or "ndcg@10" not in ms:
            continue
        out.append(f"| `{variant}` | " + " | ".join(cell(ms[m]) if m in ms else "" for m in metrics) + " |")
    if "generated-static" in doc:
        rel = doc["generated-static"]["ndcg@10"]["value"] / doc["static"]["ndcg@10"]["value"]
        out += ["", f"Relative NDCG@10 change of `generated` over `static` (seed {min(doc['seeds'])}): {rel:+.2%}."]
    if "slimmed@0.5" in doc and "generated" in doc:
        rel = doc["slimmed@0.5"]["ndcg@10"]["value"] / doc["generated"]["ndcg@10"]["value"] - 1
        out.append(f"`slimmed@0.5` against unslimmed `generated`: {rel:+.2%} NDCG@10.")
    if "int8" in doc and "generated" in doc:
        diff = doc["int8"]["ndcg@10"]["value"] - doc["generated"]["ndcg@10"]["value"]
        out.append(f"int8 encoding against fp32 factors: {diff:+.5f} absolute NDCG@10.")
    out += ["", "Per seed (test split; paired differences bootstrapped over users):", ""]
    cols = [v for v in ("static", "generated", "generated-static", "slimmed@0.5", "cold:generated-static")
            if any(v in s for s in doc["seeds"].values())]
    out.append("| seed | train s | static s | peak RSS MiB | " + " | ".join(f"{c} NDCG@10" for c in cols) + " |")
    out.append("|---|---|---|---|" + "---|" * len(cols))
    for seed, s in doc["seeds"].items():
        out.append(f"| {seed} | {s['wall_seconds']:.0f} | {s['static_seconds']:.0f} | {s['peak_rss_mib']:.0f} | "
                   + " | ".join(cell(s[c]["ndcg@10"]) if c in s else "" for c in cols) + " |")
    sizes = doc.get("sizes", {})
    if sizes:
        out += ["", "Sizes (trained bundle of the first seed):", "",
                "| model | parameters | non-embedding parameters | FLOPs to score 1 user x 101 |", "|---|---|---|---|"]
        for key in ("device", "slimmed@0.25", "slimmed@0.5", "slimmed@0.75"):
            if key in sizes:
                s = sizes[key]
                out.append(f"| {key} | {s['parameters']:,} | {s['non_embedding_parameters']:,} | "
                           f"{s['flops_per_user_101']:,} |")
        if "generator" in sizes:
            g = sizes["generator"]
            out += ["", f"Generator: {g['parameters']:,} parameters ({g['trainable_parameters']:,} trained; the rest "
                    f"is the device model's frozen item table), {g['flops_per_bundle']:,} FLOPs per bundle, "
                    f"{g['generated_parameters_per_device']:,} generated parameters per device.", "",
                    "| encoding | bytes per bundle | bytes per generated parameter | bytes with 0.5 masks |",
                    "|---|---|---|---|"]
            for enc, b in sizes["bytes_per_bundle"].items():
                out.append(f"| {enc} | {b:.0f} | {sizes['bytes_per_generated_parameter'][enc]:.2f} | "
                           f"{sizes['bytes_per_bundle_with_masks@0.5'][enc]:.0f} |")
    cfg = meta["train_config"]
    out += ["", f"Device model: {meta['device_config']}. Generator: {meta['generator_config']}. "
            f"Training: {cfg}."]
    return "\n".join(out) + "\n" + note(f"quality-{name}")


def reference_section(doc: dict) -> str:
    """Loss x protocol table of one `tools/bench_reference.py` run."""
    variant = doc.get("variant")
    title = doc["dataset"] + (f" ({' '.join(variant['train_args'])})" if variant else "")
    out = [f"### {title}", "", f"Command: `{doc['meta']['command']}`", ""]
    target = doc.get("target")
    if target:
        out += [f"Published reference (test, sampled protocol): HR@10 {target['hr@10']:.4f} / "
                f"NDCG@10 {target['ndcg@10']:.4f}.", ""]
    out += ["| loss | valid HR@10 | valid NDCG@10 | valid full NDCG@10 | test HR@10 [95% CI] | "
            "test NDCG@10 [95% CI] | test full HR@10 | test full NDCG@10 [95% CI] | epochs (best) | wall s | "
            "CPU s (threads) | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ci(r: dict, protocol: str, m: str) -> str:
        lo, hi = r[protocol]["ci"][m]
        return f"{r[protocol][m]:.4f} [{lo:.4f}, {hi:.4f}]"

    for r in doc["losses"]:
        v = r["valid"]
        mark = " (best)" if r["loss"] == doc["best"] else ""
        reach = " ✓" if r.get("reaches_target") else ""
        cpu = f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") is not None else "–"
        out.append(f"| `{r['loss']}`{mark} | {v['sampled']['hr@10']:.4f} | {v['sampled']['ndcg@10']:.4f} | "
                   f"{v['full']['ndcg@10']:.4f} | {ci(r, 'sampled', 'hr@10')}{reach} | {ci(r, 'sampled', 'ndcg@10')} | "
                   f"{r['full']['hr@10']:.4f} | {ci(r, 'full', 'ndcg@10')} | {r['epochs']} ({r['best_epoch']}) | "
                   f"{r['seconds']:.0f} | {cpu} ({r.get('threads', '?')}) | {r['peak_rss_mib']:.0f} |")
    if "popularity" in doc:
        v, t = doc["popularity"]["valid"], doc["popularity"]["test"]
        out.append(f"| popularity (no training) | {v['sampled']['hr@10']:.4f} | {v['sampled']['ndcg@10']:.4f} | "
                   f"{v['full']['ndcg@10']:.4f} | {ci(t, 'sampled', 'hr@10')} | {ci(t, 'sampled', 'ndcg@10')} | "
                   f"{t['full']['hr@10']:.4f} | {ci(t, 'full', 'ndcg@10')} | – | – | – | – |")
    sel = doc["selection"]
    out += ["", f"Chosen on validation: **`{doc['best']}`** (rule: {sel['rule']}; qualifying: "
            f"{', '.join(f'`{q}`' for q in sel['qualifying'])}). ✓ marks a test HR@10 and NDCG@10 at or above the "
            "published reference's. Wall seconds are those of `paramcast train` (validation included) on the "
            "shared machine; CPU seconds (user + system) are its own work, whatever the others ran beside it."]
    return "\n".join(out) + "\n" + note(f"reference-{doc['dataset']}" + (f"-{variant['suffix']}" if variant else ""))


def device_section(doc: dict) -> str:
    lat = doc["latency_ms"]
    out = ["## Device runtime (ONNX Runtime)", "", "Command: `python tools/bench_device.py "
           + (f"--model {doc['model']}" if not doc["model"].startswith("random") else "") + "`", "",
           f"Threads: {doc['threads']}; machine: {doc['machine']}.", "",
           "| variant | batch | p50 ms | p99 ms |", "|---|---|---|---|"]
    for variant, by_batch in lat.items():
        for label, m in by_batch.items():
            out.append(f"| ONNX Runtime {variant} | {label} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} |")
    for variant, by_batch in doc["torch_eager_latency_ms"].items():
        for label, m in by_batch.items():
            out.append(f"| PyTorch eager {variant} | {label} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} |")
    apply, mem, ad = doc["apply_ms"], doc["memory"], doc["adapter_mechanism"]
    out += ["", f"- ONNX Runtime vs PyTorch eager, 1 user x 101: **{doc['ort_vs_torch_speedup']:.2f}x** faster "
            f"(by batch: {', '.join(f'{k} {v:.2f}x' for k, v in doc['ort_vs_torch_speedup_by_batch'].items())}); "
            f"max |ORT - torch| = {doc['max_abs_diff_ort_vs_torch']:.2e}.",
            f"- Apply a decoded bundle: p50 {apply['apply_decoded']['p50_ms'] * 1000:.1f} us, "
            f"p99 {apply['apply_decoded']['p99_ms'] * 1000:.1f} us (target < 1 ms); decode + apply p50 "
            f"{apply['decode_and_apply']['p50_ms'] * 1000:.1f} us; first apply of a new mask (builds a slimmed "
            f"session) {apply['apply_new_mask_first_time_ms']:.1f} ms.",
            f"- Package {doc['package_bytes'] / 1e6:.2f} MB (model.onnx {doc['model_onnx_bytes'] / 1e6:.2f} MB); "
            f"slimmed@0.5 graph {doc['slimmed_size_ratio']:.2f}x the size, latency ratio "
            f"{', '.join(f'{k} {v:.2f}x' for k, v in doc['slimmed_latency_ratio'].items())}.",
            f"- Resident memory of a device process (no torch): {mem['rss_after_imports_mb']:.1f} MB after imports, "
            f"{mem['rss_package_loaded_mb']:.1f} MB with the package loaded, "
            f"{mem['rss_with_slimmed_session_mb']:.1f} MB with a slimmed session beside it.",
            f"- Bundle on the wire ({doc['encoding']}): {doc['bundle_wire_bytes']['plain']} bytes, "
            f"{doc['bundle_wire_bytes']['with_masks']} with 0.5 masks.",
            f"- Adapter mechanism, measured both ways: graph inputs apply p50 "
            f"{ad['apply_graph_inputs']['p50_ms'] * 1000:.1f} us and score 1x101 p50 "
            f"{ad['score_1x101_graph_inputs']['p50_ms']:.3f} ms; ONNX Runtime's native LoRA API apply p50 "
            f"{ad['apply_native_lora']['p50_ms'] * 1000:.0f} us, p99 {ad['apply_native_lora']['p99_ms']:.2f} ms and "
            f"score p50 {ad['score_1x101_native_lora']['p50_ms']:.3f} ms (identical scores). Chosen: {ad['choice']}"]
    return "\n".join(out) + "\n" + note("device")


def service_section(doc: dict) -> str:
    model = doc["model"]
    out = ["## Cloud service (gRPC)", "", f"Model: `{model['model_id']}` {model['base_version']}, generator width "
           f"{model['generator']['width']}, {model['generated_parameters_per_bundle']} generated parameters per "
           f"bundle. Settings: {doc['settings']}.", "",
           "| concurrency | Generate /s | p50 ms | p99 ms | mean batch | echo /s | echo p50 ms |",
           "|---|---|---|---|---|---|---|"]
    echo = {e["concurrency"]: e for e in doc["echo"]}
    for g in doc["generate"]:
        e = echo.get(g["concurrency"], {})
        out.append(f"| {g['concurrency']} | {g['throughput_per_s']:.0f} | {g['p50_ms']:.1f} | {g['p99_ms']:.1f} | "
                   f"{g['mean_batch_size']:.1f} | {e.get('throughput_per_s', float('nan')):.0f} | "
                   f"{e.get('p50_ms', float('nan')):.2f} |")
    out += ["", f"- `batching_speedup` (concurrency 64, max batch 64 vs 1): **{doc['batching_speedup']:.2f}x**.",
            f"- `generate_vs_echo` (best concurrency): **{doc['generate_vs_echo']:.2f}**.",
            f"- Bytes per bundle: {doc['bytes_per_bundle']:.0f}.",
            f"- Soak: `soak_rss_growth` {doc['soak_rss_growth']:+.2%}, `soak_failed_calls` {doc['soak_failed_calls']}"
            + (f" over {doc['soak']['seconds']:.0f} s and {doc['soak']['calls']:,} calls." if "soak" in doc else ".")]
    return "\n".join(out) + "\n" + note("service")


def simulation_section(doc: dict, name: str) -> str:
    out = [f"### {name}", "", f"Command: `{doc.get('command', '')}`", "",
           "| policy | request rate | NDCG@10 [95% CI] | HR@10 | AUC | bytes per device |", "|---|---|---|---|---|---|"]
    for p in doc["policies"]:
        out.append(f"| `{p['name']}` | {p['request_rate']:.3f} | {cell(p['ndcg@10'])} | {cell(p['hr@10'])} | "
                   f"{cell(p['auc'])} | {p['bytes_per_device']:.0f} |")
    out += ["", f"In-process throughput: {doc['device_steps_per_s']:,.0f} device-steps/s."]
    return "\n".join(out) + "\n" + note(f"simulation-{name}")


def render() -> str:
    parts = ["# ParamCast benchmarks", "",
             "Every figure below is read from `benchmarks/results/*.json` by `python tools/write_benchmarks.py`; "
             "each section names the command that wrote its file. Machine: 2 cores, 24 GiB, no GPU (shared, so "
             "absolute times are noisy; ratios are measured within one run).", note("summary")]
    quality = sorted(RESULTS.glob("quality-*.json"))
    if quality:
        parts += ["## Quality (leave-one-out; 100 sampled negatives, and the full catalogue in `full:*` columns)", "",
                  "`static` is the device model alone; `generated` adds a delta generated from the window ending at "
                  "the evaluation point; `slimmed@k` also applies the generated subnet at keep ratio k; `stale@k` uses "
                  "the delta generated k interactions earlier; `int8` is `generated` after the wire encoding; "
                  "`cold:*` are users held out of training entirely. Differences (`a-b`) are paired over users.", ""]
        parts += [quality_section(json.loads(p.read_text())) for p in quality]
    reference = sorted(RESULTS.glob("reference-*.json"))
    if reference:
        parts += ["## Training losses on both protocols (`paramcast train --preset sasrec-reference`)", "",
                  "Sampled: the target among 100 unseen items sampled uniformly (SASRec's protocol). Full: the "
                  "target among the whole catalogue, the user's other items excluded (`full:*` in "
                  "`paramcast evaluate --protocol both`). Static device model, seed 42, every user in training.",
                  note("reference")]
        parts += [reference_section(json.loads(p.read_text())) for p in reference]
    sim = sorted(RESULTS.glob("simulation-*.json"))
    if sim:
        parts += ["## Request policies and simulation", ""]
        parts += [simulation_section(json.loads(p.read_text()), p.stem.removeprefix("simulation-")) for p in sim]
    if (d := load("device-latency.json")) is not None:
        parts.append(device_section(d))
    if (s := load("service-load.json")) is not None:
        parts.append(service_section(s))
    return "\n".join(parts)


def main() -> int:
    (ROOT / "BENCHMARKS.md").write_text(render())
    print(ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

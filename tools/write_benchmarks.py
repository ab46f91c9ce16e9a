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
    first = doc["seeds"][0]["seed"]
    if "generated-static" in doc:
        rel = doc["generated-static"]["ndcg@10"]["value"] / doc["static"]["ndcg@10"]["value"]
        out += ["", f"Relative NDCG@10 change of `generated` over `static` (seed {first}): {rel:+.2%}."]
    if "gap_closed" in doc:
        out.append(f"Share of the cloud model's lead carried to the device (`gap_closed`, NDCG@10, seed {first}): "
                   f"{cell(doc['gap_closed']['ndcg@10'], 2)}.")
    pooled = doc.get("cold:pooled", {}).get("generated-static")
    if pooled:
        seeds = doc["cold:pooled"]["seeds"]  # older files hold a count, newer ones the seeds pooled
        which = f"{len(seeds)} seeds ({', '.join(map(str, seeds))})" if isinstance(seeds, list) else f"{seeds} seeds"
        out.append(f"Cold users pooled over {which}, generated - static NDCG@10: "
                   f"{cell(pooled['ndcg@10'])} ({pooled['ndcg@10']['users']} users).")
    if "carried" in meta:
        carried = meta["carried"]["seeds"]
        out.append(f"Seed{'s' if len(carried) > 1 else ''} {', '.join(map(str, carried))} carried from an "
                   f"earlier run of the same configuration: `{meta['carried']['command']}`.")
    if "slimmed@0.5" in doc and "generated" in doc:
        rel = doc["slimmed@0.5"]["ndcg@10"]["value"] / doc["generated"]["ndcg@10"]["value"] - 1
        out.append(f"`slimmed@0.5` against unslimmed `generated`: {rel:+.2%} NDCG@10.")
    if "int8" in doc and "generated" in doc:
        diff = doc["int8"]["ndcg@10"]["value"] - doc["generated"]["ndcg@10"]["value"]
        out.append(f"int8 encoding against fp32 factors: {diff:+.5f} absolute NDCG@10.")
    out += ["", "Per seed (test split; paired differences bootstrapped over users):", ""]
    cols = [v for v in ("static", "generated", "cloud", "generated-static", "gap_closed")
            if any(v in s for s in doc["seeds"])]
    out.append("| seed | train s | peak RSS MiB | " + " | ".join(f"{c} NDCG@10" for c in cols) + " |")
    out.append("|---|---|---|" + "---|" * len(cols))
    for s in doc["seeds"]:
        d = s["details"]
        out.append(f"| {s['seed']} | {d['wall_seconds']:.0f} | {d['peak_rss_mib']:.0f} | "
                   + " | ".join(cell(s[c]["ndcg@10"], 2 if c == "gap_closed" else 4) if c in s else ""
                                for c in cols) + " |")
    sizes = doc.get("sizes", {})
    if sizes:
        out += ["", "Sizes (trained bundle of the first seed):", "",
                "| model | parameters | non-embedding parameters | FLOPs to score 1 user x 101 |", "|---|---|---|---|"]
        for key in ("device", "slimmed@0.25", "slimmed@0.5", "slimmed@0.75"):
            if key in sizes:
                s = sizes[key]
                out.append(f"| {key} | {s['parameters']:,} | {s['non_embedding_parameters']:,} | "
                           f"{s['flops_per_user_101']:,} |")
        table = sizes.get("device", {}).get("cloud_item_table_values", 0)
        if table:
            out += ["", f"The device model also carries the cloud model's item table for the `head.cloud` slot: "
                    f"{table:,} values ({table * 4 / 1024:,.0f} KiB as float32), beside its parameters."]
        if "generator" in sizes:
            g = sizes["generator"]
            if "cloud" in sizes:
                c = sizes["cloud"]
                out += ["", f"Cloud model: {c['parameters']:,} parameters, {c['flops_per_request_101']:,} FLOPs to "
                        "score one full history x 101 (what serving every interaction from the cloud costs)."]
            out += ["", f"Generator: {g['parameters']:,} parameters ({g['trainable_parameters']:,} trained; the rest "
                    f"is its frozen copy of the cloud encoder), {g['flops_per_bundle']:,} FLOPs per bundle, "
                    f"{g['generated_parameters_per_device']:,} generated parameters per device.", "",
                    "| encoding | bytes per bundle | bytes per generated parameter | bytes with 0.5 masks |",
                    "|---|---|---|---|"]
            for enc, b in sizes["bytes_per_bundle"].items():
                out.append(f"| {enc} | {b:.0f} | {sizes['bytes_per_generated_parameter'][enc]:.2f} | "
                           f"{sizes['bytes_per_bundle_with_masks@0.5'][enc]:.0f} |")
    cfg = meta["train_config"]
    out += ["", f"Device model: {meta['device_config']}. Cloud model: {meta.get('cloud_config')}. "
            f"Generator: {meta['generator_config']}. Training: {cfg}."]
    return "\n".join(out) + "\n" + note(f"quality-{name}")


def reference_section(doc: dict) -> str:
    """Loss x protocol table of one `tools/bench_reference.py` run."""
    variant = doc.get("variant")
    # a variant with the preset's own flags is a separate run of more losses, named by its suffix
    title = doc["dataset"] + (f" ({' '.join(variant['train_args']) or 'run ' + variant['suffix']})" if variant else "")
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
    paired = sel.get("paired_valid")
    if paired:
        out += ["", f"`{doc['best']}` minus each other loss on the validation users "
                    "(paired per user, 95% bootstrap CI):",
                "", "| against | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 |", "|---|---|---|---|---|"]
        for loss, d in paired.items():
            out.append(f"| `{loss}` | " + " | ".join(cell(d[m]) for m in ("hr@10", "ndcg@10", "full:hr@10",
                                                                           "full:ndcg@10")) + " |")
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
            *([f"- `service_vs_in_process` (concurrency 64 against the generator + codec alone at the service's "
               f"mean batch of {doc['in_process']['batch']}, {doc['in_process']['bundles_per_s']:.0f} bundles/s, "
               f"{doc['in_process']['generator_flops_per_bundle']:,} FLOPs per bundle): "
               f"**{doc['service_vs_in_process']:.2f}**."] if "in_process" in doc else []),
            f"- Bytes per bundle: {doc['bytes_per_bundle']:.0f}.",
            f"- Soak: `soak_rss_growth` {doc['soak_rss_growth']:+.2%}, `soak_failed_calls` {doc['soak_failed_calls']}"
            + (f" over {doc['soak']['seconds']:.0f} s and {doc['soak']['calls']:,} calls." if "soak" in doc else ".")]
    return "\n".join(out) + "\n" + note("service")


def oracle_section(doc: dict, name: str) -> str:
    out = [f"### {name}", "", f"Command: `{doc['command']}` ({doc['users']} validation users, {doc['steps']} Adam "
           f"steps per fit). Static NDCG@10 {doc['static']['ndcg@10']:.4f}, cloud {doc['cloud']['ndcg@10']:.4f}.", "",
           "| slot | rank | generated parameters | NDCG@10 | gap closed [95% CI] | NDCG@10 after int8 |",
           "|---|---|---|---|---|---|"]
    for r in doc["oracle"]:
        lo, hi = r["gap_closed_ci"]
        out.append(f"| {r['slot']} | {r['rank'] if r['rank'] is not None else '-'} | {r['parameters']} | "
                   f"{r['ndcg@10']:.4f} | {r['gap_closed']:.2f} [{lo:.2f}, {hi:.2f}] | "
                   f"{r['int8_ndcg@10']:.4f} |" if "int8_ndcg@10" in r else
                   f"| {r['slot']} | - | {r['parameters']} | {r['ndcg@10']:.4f} | {r['gap_closed']:.2f} "
                   f"[{lo:.2f}, {hi:.2f}] | - |")
    return "\n".join(out) + "\n" + note(f"oracle-{name}")


def scale_section(doc: dict) -> str:
    svc, sim, train = doc["service"], doc["simulation"], doc["training"]
    ray, plain = doc["ray_bundles_per_s"], doc["plain_bundles_per_s"]
    kill = svc["replica_kill"]
    q = doc["ddp_quality_delta"]
    lo, hi = q["ci"]
    out = ["## Scale-out (Ray Serve, the simulation on Ray, DDP training)", "", f"Command: `{doc['command']}`", "",
           f"Machine: {doc['machine']['cpus']} cores, load average {doc['machine']['load_average_before'][0]:.1f} "
           f"before the run. {doc['bound']}", "",
           f"Each throughput is the median of {svc['settings']['rounds']} rounds taken in turn.", "",
           f"| Generate at concurrency {svc['settings']['concurrency']} | bundles/s | p50 ms | p99 ms |",
           "|---|---|---|---|",
           f"| `paramcast serve` ({svc['settings']['plain_server']}) | {plain:.0f} | {svc['plain']['p50_ms']:.1f} | "
           f"{svc['plain']['p99_ms']:.1f} |"]
    for replicas, rate in ray.items():
        row = svc["ray"][replicas]
        label = f"{replicas} replica{'' if replicas == '1' else 's'}"
        out.append(f"| Ray Serve, {label} ({svc['settings']['replica']}) | {rate:.0f} | {row['p50_ms']:.1f} | "
                   f"{row['p99_ms']:.1f} |")
    with_retries = kill["with_retries"]
    out += ["", f"- `ray_bundles_per_s` 2 / 1 replicas: {ray['2'] / ray['1']:.2f}x; 1 replica / plain server: "
            f"{ray['1'] / plain:.2f}x.",
            f"- `replica_kill_failed_calls`: **{doc['replica_kill_failed_calls']}** of "
            f"{with_retries['ok'] + with_retries['failed']:,} device calls (32 device clients with their default "
            f"retry policy, {with_retries['in_flight_at_kill']} in flight when one of 2 replicas was killed; Serve "
            f"had a new replica running {with_retries['replaced_after_s']:.1f} s after the kill). With gRPC retries "
            f"off, the same kill failed {doc['replica_kill_failed_calls_without_retries']} calls.",
            f"- Simulation ({sim['devices']['test']} test and {sim['devices']['validation']} validation devices in "
            f"{sim['devices']['shards']['test']} + {sim['devices']['shards']['validation']} shards of "
            f"{sim['config']['shard_devices']}): `ray_sim_identical` **{doc['ray_sim_identical']}**; "
            f"`ray_sim_device_steps_per_s` 1 worker {doc['ray_sim_device_steps_per_s']['1']:,.0f}, 2 workers "
            f"{doc['ray_sim_device_steps_per_s']['2']:,.0f}; in-process {sim['inprocess_device_steps_per_s']:,.0f} "
            f"on the same shards and {sim['inprocess_one_shard_device_steps_per_s']:,.0f} with the devices as "
            "one fleet.",
            f"- `ddp_epoch_seconds` (static stage, validation included): 1 process "
            f"{doc['ddp_epoch_seconds']['1']:.1f} s, 2 processes {doc['ddp_epoch_seconds']['2']:.1f} s. "
            f"`ddp_quality_delta` ({q['metric']}, 2 processes minus 1, {q['users']} users): {q['value']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] ({'within noise' if q['within_noise'] else 'outside noise'}); "
            f"NDCG@10 1 process {train['quality']['1']:.4f}, 2 processes {train['quality']['2']:.4f}.",
            f"- Training commands: `{train['commands']['1']}` and `{train['commands']['2']}`."]
    return "\n".join(out) + "\n" + note("scale-out")


def simulation_section(doc: dict, name: str) -> str:
    out = [f"### {name}", "", f"Command: `{doc.get('command', '')}`", "",
           "| policy | request rate | NDCG@10 [95% CI] | HR@10 | AUC | bytes per device |", "|---|---|---|---|---|---|"]
    for p in doc["policies"]:
        out.append(f"| `{p['name']}` | {p['request_rate']:.3f} | {cell(p['ndcg@10'])} | {cell(p['hr@10'])} | "
                   f"{cell(p['auc'])} | {p['bytes_per_device']:.0f} |")
    net = doc.get("network")
    if net and net.get("device_scoring") == "agents":
        calls = max(p["network"]["max_concurrent_calls"] for p in doc["policies"] if "network" in p)
        out += ["", f"Network mode: {net['devices']} device agents (ONNX Runtime, policy, bundle store, gRPC "
                f"client each) on one event loop against `paramcast serve`, up to {calls} calls in flight at once: "
                f"{net['device_steps_per_s']:,.0f} device-steps/s over {net['device_steps']:,} test device-steps "
                f"(requests included); {doc['device_steps_per_s']:,.0f} device-steps/s over the whole run."]
    else:
        out += ["", f"In-process throughput: {doc['device_steps_per_s']:,.0f} device-steps/s."]
    bars = doc.get("bars", {})
    if bars.get("evaluated"):
        line = (f"At a {bars['budget']:.0%} budget, the gate selected on validation is `{bars['gate']}` "
                f"({bars['request_rate']:.1%} of test steps)")
        if "always_minus_never" in bars:
            line += f"; always - never NDCG@10 {cell(bars['always_minus_never'])}"
        if "gain_kept" in bars and bars.get("gain_significant"):
            line += f", of which it keeps {cell(bars['gain_kept'], 3)}"
        for b in ("random-p", "every-k"):
            if f"beats_{b}" in bars:
                line += f"; gate - {b} {cell(bars[f'beats_{b}']['ndcg@10'])}"
                if f"headroom_over_{b}" in bars:
                    line += f" (always - {b}: {cell(bars[f'headroom_over_{b}']['ndcg@10'])})"
        out += ["", line + "."]
    return "\n".join(out) + "\n" + note(f"simulation-{name}")


def policy_cost_section(doc: dict) -> str:
    base = doc["scoring_call_us"]["p50"]
    out = [f"### What a policy costs on the device ({doc['dataset']})", "", f"Command: `{doc.get('command', '')}`", "",
           f"One scoring call (1 user x {doc['candidates']} candidates, bundle applied, hidden {doc['hidden']}): "
           f"p50 {base:.1f} us. The bar: every gate costs at most 10% of it (`gate_cost_vs_score`).", "",
           "| policy | decision p50 us | p99 us | share of a scoring call | batched, per device us |",
           "|---|---|---|---|---|"]
    for name, p in doc["policies"].items():
        out.append(f"| `{name}` | {p['decision_us']['p50']:.1f} | {p['decision_us']['p99']:.1f} | "
                   f"{p.get('gate_cost_vs_score', p['fraction_of_scoring_call']):.1%} | "
                   f"{p['batched_per_device_us']:.2f} |")
    bar = doc["bar"]
    out += ["", f"Every gate at or under 10%: **{'yes' if bar['gate_under_10_percent_of_scoring'] else 'no'}** "
            f"(most costly: `{bar['worst_gate']}`)."]
    return "\n".join(out) + "\n" + note(f"policy-cost-{doc['dataset']}")


def reliability_section(doc: dict) -> str:
    chaos, fuzz, settings = doc["chaos"], doc["fuzz"], doc["settings"]
    faults = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in chaos["faults_by_kind"].items())
    out = ["## Reliability (chaos and fuzzing)", "", f"Command: `{doc['command']}` (the bounded versions run in CI: "
           "`python -m pytest tests/integration/test_chaos.py tests/unit/test_fuzz.py`).", "",
           "| key | value |", "|---|---|"]
    for key in ("faults_injected", "calls_failed_after_retries", "calls_failed_while_server_up", "bundles_lost",
                "fuzz_mutants", "fuzz_crashes", "fuzz_accepted_corrupt"):
        out.append(f"| `{key}` | {doc[key]:,} |")
    out.append(f"| `rss_growth_bad_input` | {doc['rss_growth_bad_input']:+.2%} |")
    rss = chaos["rss_kib"]
    out += ["", f"- Chaos: {settings['devices']} device processes against `paramcast serve` on loopback (tokens, "
            f"download byte rate), {chaos['seconds']:.0f} s; faults: {faults}.",
            f"- Refresh outcomes: {chaos['refresh_outcomes']}; of the calls that failed after retries, "
            f"{doc['calls_failed_while_server_up']} fell outside the windows where the server was down (from its "
            f"kill to {chaos['reconnect_grace_s']:.0f} s after it was ready again).",
            f"- End state: {chaos['devices_with_bundle']} of {settings['devices']} devices hold a verified bundle, "
            f"{chaos['packages_identical']} packages byte-identical to the server's, {chaos['stray_temporaries']} "
            f"stray temporaries ({chaos['temporaries_swept']} left by killed writers, swept at start-up), "
            f"{chaos['server_errors']} error lines in the server logs.",
            f"- Bad input: {sum(chaos['bad_input_codes'].values()):,} calls answered {chaos['bad_input_codes']}; "
            f"server RSS {rss['before'] / 1024:.0f} -> {rss['after'] / 1024:.0f} MiB.",
            f"- Fuzz: {fuzz['mutants']:,} mutants in {fuzz['seconds']:.0f} s ({fuzz['mutants_per_s']:.0f}/s), refused "
            f"by stage {fuzz['refused_by_stage']}, {fuzz['accepted']:,} accepted and scored finite numbers; "
            f"slowest mutant {fuzz['slowest_mutant_ms']:.1f} ms.",
            f"- Model: `{doc['model']['model_id']}` {doc['model']['base_version']}, package "
            f"{doc['model']['package_bytes']:,} bytes; machine: {doc['machine']['cpus']} CPUs."]
    return "\n".join(out) + "\n" + note("reliability")


def render() -> str:
    parts = ["# ParamCast benchmarks", "",
             "Every figure below is read from `benchmarks/results/*.json` by `python tools/write_benchmarks.py`; "
             "each section names the command that wrote its file. Machine: 2 cores, 24 GiB, no GPU (shared, so "
             "absolute times are noisy; ratios are measured within one run).", note("summary")]
    quality = sorted(RESULTS.glob("quality-*.json"))
    if quality:
        parts += ["## Quality (leave-one-out; 100 sampled negatives, and the full catalogue in `full:*` columns)", "",
                  "`static` is the device model alone; `cloud` is the cloud model on the whole history (every "
                  "interaction served by the cloud: the upper bound); `generated` adds a delta generated from the "
                  "history ending at the evaluation point; `slimmed@k` also applies the generated subnet at keep "
                  "ratio k; `stale@k` uses the delta generated k interactions earlier; `int8` is `generated` after "
                  "the wire encoding; "
                  "`cold:*` are users held out of training entirely. Differences (`a-b`) are paired over users.", ""]
        parts += [quality_section(json.loads(p.read_text())) for p in quality]
    oracle = sorted(RESULTS.glob("oracle-*.json"))
    if oracle:
        parts += ["## What the delta format can carry (oracle)", "",
                  "Per-user factors fitted directly against the cloud model's next-item distribution on the device's "
                  "own window (tools/bench_oracle.py; cloud/oracle.py); `gap closed` = (oracle - static) / "
                  "(cloud - static) on the validation split.", ""]
        parts += [oracle_section(json.loads(p.read_text()), p.stem.removeprefix("oracle-")) for p in oracle]
    # Each dataset's preset table first, then its variants (files reference-<dataset>-<suffix>.json).
    reference = sorted((json.loads(p.read_text()) for p in RESULTS.glob("reference-*.json")),
                       key=lambda doc: (doc["dataset"], doc.get("variant") is not None,
                                        (doc.get("variant") or {}).get("suffix", "")))
    if reference:
        parts += ["## Training losses on both protocols (`paramcast train --preset sasrec-reference`)", "",
                  "Sampled: the target among 100 unseen items sampled uniformly (SASRec's protocol). Full: the "
                  "target among the whole catalogue, the user's other items excluded (`full:*` in "
                  "`paramcast evaluate --protocol both`). Static device model, seed 42, every user in training.",
                  note("reference")]
        parts += [reference_section(doc) for doc in reference]
    sim = sorted(RESULTS.glob("simulation-*.json"))
    if sim:
        parts += ["## Request policies and simulation", ""]
        parts += [simulation_section(json.loads(p.read_text()), p.stem.removeprefix("simulation-")) for p in sim]
    parts += [policy_cost_section(json.loads(p.read_text())) for p in sorted(RESULTS.glob("policy-cost-*.json"))]
    if (d := load("device-latency.json")) is not None:
        parts.append(device_section(d))
    if (s := load("service-load.json")) is not None:
        parts.append(service_section(s))
    if (s := load("scale-out.json")) is not None:
        parts.append(scale_section(s))
    if (r := load("reliability.json")) is not None:
        parts.append(reliability_section(r))
    return "\n".join(parts)


def main() -> int:
    (ROOT / "BENCHMARKS.md").write_text(render())
    print(ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

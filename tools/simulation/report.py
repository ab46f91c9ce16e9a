"""Writing a simulation report: the policy table, the JSON document and the plots (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# What a report holds about the machine it ran on rather than about the policies: how long things
# took, and the command line; two runs of one configuration differ only in these.
_MACHINE_KEYS = ("device_steps_per_s", "throughput", "command", "files")
_MACHINE_POLICY_KEYS = ("seconds",)
_MACHINE_NETWORK_KEYS = ("latency_ms", "bundles_per_s")


def without_timings(report: dict) -> dict:
    """The report less its timings (and command line), for comparing two runs of one configuration."""
    out = json.loads(json.dumps({k: v for k, v in report.items() if k not in _MACHINE_KEYS}))
    for p in out.get("policies", []):
        for k in _MACHINE_POLICY_KEYS:
            p.pop(k, None)
            p.get("validation", {}).pop(k, None)
        for k in _MACHINE_NETWORK_KEYS:
            p.get("network", {}).pop(k, None)
    return out


def _ci(x: dict) -> str:
    lo, hi = x["ci"]
    return f"{x['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def table(report: dict) -> str:
    """The policy table as aligned text, then the bar check and throughput."""
    head = ("policy", "req/step", "bytes/device", "NDCG@10 [95% CI]", "HR@10", "AUC", "gain kept")
    rows = []
    fresh = next((d for d in report.get("paired", []) if d["a"] == "always" and d["b"] == "never"), None)
    gain_is_real = fresh is not None and fresh["ndcg@10"]["ci"][0] > 0
    for p in report["policies"]:
        kept = p.get("gain_kept") if gain_is_real else None
        rows.append((
            p["name"], f"{p['request_rate']:.4f}", f"{p['bytes_per_device']:,.0f}", _ci(p["ndcg@10"]),
            f"{p['hr@10']['value']:.4f}", f"{p['auc']['value']:.4f}",
            f"{kept['value']:.1%}" if kept and math.isfinite(kept["value"]) else "-",
        ))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    d = report["devices"]
    lines.append("")
    lines.append(f"{d['test']} test devices ({d['test_steps']:,} steps), thresholds calibrated on "
                 f"{d['validation']} validation devices ({d['validation_steps']:,} steps); "
                 f"{report['bundle_bytes']:,} bytes per bundle ({report['config']['encoding']})")
    for pair in report["paired"]:
        if pair["why"].startswith(("gate vs", "headroom")):
            lines.append(f"  {pair['a']} - {pair['b']}: NDCG@10 {_ci(pair['ndcg@10'])}")
    if fresh is not None:
        lines.append(f"  always - never: NDCG@10 {_ci(fresh['ndcg@10'])}" +
                     ("" if gain_is_real else " (no significant gain from fresh bundles, so no 'gain kept' column)"))
    bars = report.get("bars", {})
    if bars.get("evaluated"):
        parts = [f"gate selected on validation at 10%: {bars['gate']} (test rate {bars['request_rate']:.4f})"]
        if "gain_kept" in bars and gain_is_real:
            parts.append(f"keeps {_ci(bars['gain_kept'])} of always-over-never")
        elif "gain_kept" in bars:
            parts.append("always does not beat never, so there is no gain to keep")
        for b in ("random-p", "every-k"):
            if f"beats_{b}" in bars:
                ok = bars[f"beats_{b}"]["ci_above_zero"]
                room = bars.get(f"headroom_over_{b}")
                parts.append(f"vs {b}: CI {'above' if ok else 'not above'} zero"
                             + (f" (always - {b}: {_ci(room['ndcg@10'])})" if room else ""))
        lines.append("; ".join(parts))
    tp = report["throughput"]
    lines.append(f"{tp['device_steps']:,} device-steps in {tp['seconds_total']:.1f}s: "
                 f"{report['device_steps_per_s']:,.0f} device-steps/s overall, "
                 f"{tp['replay_device_steps_per_s'] or 0:,.0f}/s in replays")
    return "\n".join(lines)


def headline(report: dict) -> list[str]:
    """The product's claim in a few lines: what fresh bundles gain, how much of it the gate selected
    on validation keeps at a 10% budget, and what that costs a device in bytes against `always`;
    then how the gate does against random-p and every-k at that budget, beside the headroom there
    was (always against each)."""
    fresh = next((d for d in report.get("paired", []) if d["a"] == "always" and d["b"] == "never"), None)
    if fresh is None:
        return []
    significant = fresh["ndcg@10"]["ci"][0] > 0
    lines = [f"gain from fresh bundles (always - never): NDCG@10 {_ci(fresh['ndcg@10'])}"
             + ("" if significant else " - not shown (the CI includes zero)")]
    bars = report.get("bars", {})
    by_name = {p["name"]: p for p in report["policies"]}
    always = by_name.get("always")
    gate = by_name.get(bars.get("gate", "")) if bars.get("evaluated") else None
    if gate is not None and "gain_kept" in bars and significant:
        lines.append(f"the gate ({bars['gate']}, {bars['request_rate']:.1%} of steps) keeps "
                     f"{bars['gain_kept']['value']:.0%} [{bars['gain_kept']['ci'][0]:.0%}, "
                     f"{bars['gain_kept']['ci'][1]:.0%}] of it")
    if always is not None and gate is not None and always["bytes_per_device"] > 0:
        lines.append(f"bytes per device: {gate['bytes_per_device']:,.0f} with the gate, "
                     f"{always['bytes_per_device']:,.0f} with always "
                     f"({gate['bytes_per_device'] / always['bytes_per_device']:.1%})")
    elif always is not None:
        lines.append(f"bytes per device: {always['bytes_per_device']:,.0f} with always (no gate ran at a 10% budget)")
    against = []
    for b in ("random-p", "every-k"):
        if gate is not None and f"beats_{b}" in bars:
            room = bars.get(f"headroom_over_{b}")
            against.append(f"{b} {_ci(bars[f'beats_{b}']['ndcg@10'])}"
                           + (f" (always - {b} {_ci(room['ndcg@10'])})" if room else ""))
    if against:
        lines.append("the gate against the baselines at its budget, NDCG@10: " + "; ".join(against))
    return lines


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return path


def plot(report: dict, out_dir: str | Path, suffix: str = "") -> list[Path]:
    """Two PNGs (matplotlib Agg):

    quality-vs-rate: each policy's NDCG@10 against its request rate, absolute (left) and as the
    paired difference from `never` over the same devices (right), with 95% CIs;
    quality-over-time: NDCG@10 by steps since enrolment (top) and its difference from `never`
    at the same step (bottom), one panel per budget.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["dataset"]
    files = []
    families: dict[str, list[dict]] = {}
    for p in report["policies"]:
        families.setdefault(p.get("family", p["policy"]), []).append(p)
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    budgets = sorted({p["budget"] for p in report["policies"] if p["budget"] is not None})

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], None, "NDCG@10"), (axes[1], "vs_never", "NDCG@10 - never (paired)")):
        for family, rows in families.items():
            rows = sorted(rows, key=lambda r: r["request_rate"])
            if key is not None and not all(key in r for r in rows):
                continue
            stats = [r[key]["ndcg@10"] if key else r["ndcg@10"] for r in rows]
            x = [r["request_rate"] for r in rows]
            y = [s["value"] for s in stats]
            err = [[s["value"] - s["ci"][0] for s in stats], [s["ci"][1] - s["value"] for s in stats]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[family], label=family,
                        linestyle="-" if len(rows) > 1 else "none")
        for budget in budgets:
            ax.axvline(budget, color="grey", linewidth=0.5, linestyle=":")
        if key:
            ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.001, 1.2)
        ax.set_xlabel("requests per device-step")
        ax.set_ylabel(f"{label} (test devices, 95% CI)")
    axes[0].set_title(f"{name}: quality against request rate")
    axes[1].set_title("gain over never, paired over devices")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / f"simulation-{name}{suffix}-quality-vs-rate.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    panels = budgets or [None]
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 7), squeeze=False, sharex=True)
    never = next((p for p in report["policies"] if p["policy"] == "never"), None)
    base = report["over_time"][never["name"]]["ndcg@10"] if never else None
    for col, budget in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for p in report["policies"]:
            if p["budget"] not in (budget, None):
                continue
            series = report["over_time"][p["name"]]
            color = colors[p.get("family", p["policy"])]
            top.plot(series["step"], series["ndcg@10"], label=p["name"], linewidth=1, color=color)
            if base is not None:
                bottom.plot(series["step"], np.subtract(series["ndcg@10"], base), linewidth=1, color=color)
        top.set_title(f"{name}: budget {budget:g}" if budget is not None else name)
        top.set_ylabel("NDCG@10 (devices at that step)")
        bottom.set_ylabel("NDCG@10 - never at that step")
        bottom.axhline(0.0, color="black", linewidth=0.5)
        bottom.set_xscale("symlog", linthresh=10)
        bottom.set_xlabel("steps since enrolment")
        top.legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / f"simulation-{name}{suffix}-quality-over-time.png")
    fig.savefig(files[-1], dpi=80)  # many thin lines: a lower resolution keeps the file small and readable
    plt.close(fig)
    return files

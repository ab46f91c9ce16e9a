"""Writing a simulation report: the policy table, the JSON document and the plots (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _ci(x: dict) -> str:
    lo, hi = x["ci"]
    return f"{x['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def table(report: dict) -> str:
    """The policy table as aligned text, then the bar check and throughput."""
    head = ("policy", "req/step", "bytes/device", "NDCG@10 [95% CI]", "HR@10", "AUC", "gain kept")
    rows = []
    for p in report["policies"]:
        kept = p.get("gain_kept")
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
        if pair["why"].startswith("gate vs"):
            lines.append(f"  {pair['a']} - {pair['b']}: NDCG@10 {_ci(pair['ndcg@10'])}")
    bars = report.get("bars", {})
    if bars.get("evaluated"):
        parts = [f"gate selected on validation at 10%: {bars['gate']} (test rate {bars['request_rate']:.4f})"]
        if "gain_kept" in bars:
            parts.append(f"keeps {_ci(bars['gain_kept'])} of always-over-never")
        for b in ("random-p", "every-k"):
            if f"beats_{b}" in bars:
                ok = bars[f"beats_{b}"]["ci_above_zero"]
                parts.append(f"vs {b}: CI {'above' if ok else 'not above'} zero")
        lines.append("; ".join(parts))
    tp = report["throughput"]
    lines.append(f"{tp['device_steps']:,} device-steps in {tp['seconds_total']:.1f}s: "
                 f"{report['device_steps_per_s']:,.0f} device-steps/s overall, "
                 f"{tp['replay_device_steps_per_s'] or 0:,.0f}/s in replays")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return path


def plot(report: dict, out_dir: str | Path, suffix: str = "") -> list[Path]:
    """quality-vs-rate.png (every policy's NDCG@10 against its request rate, with 95% CIs) and
    quality-over-time.png (NDCG@10 by step since enrolment, at each budget)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["dataset"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for p in report["policies"]:
        families.setdefault(p["policy"], []).append(p)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r["request_rate"])
        x = [r["request_rate"] for r in rows]
        y = [r["ndcg@10"]["value"] for r in rows]
        err = [[r["ndcg@10"]["value"] - r["ndcg@10"]["ci"][0] for r in rows],
               [r["ndcg@10"]["ci"][1] - r["ndcg@10"]["value"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family, linestyle="-" if len(rows) > 1 else "none")
    for budget in sorted({p["budget"] for p in report["policies"] if p["budget"] is not None}):
        ax.axvline(budget, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("requests per device-step")
    ax.set_ylabel("NDCG@10 (test devices, 95% CI)")
    ax.set_title(f"{name}: quality against request rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out_dir / f"simulation-{name}{suffix}-quality-vs-rate.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    budgets = sorted({p["budget"] for p in report["policies"] if p["budget"] is not None}) or [None]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for p in report["policies"]:
            if p["budget"] not in (budget, None):
                continue
            series = report["over_time"][p["name"]]
            ax.plot(series["step"], series["ndcg@10"], label=p["name"], linewidth=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("steps since enrolment")
        ax.set_ylabel("NDCG@10 (mean over devices at that step)")
        ax.set_title(f"{name}: budget {budget:g}" if budget is not None else name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / f"simulation-{name}{suffix}-quality-over-time.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files

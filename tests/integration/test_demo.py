"""`paramcast demo` end to end as a user runs it (tiny settings so it takes about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _demo(shared_data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paramcast.cli", "demo", "--data", str(shared_data / "ml-100k"), "--out", str(out),
           "--epochs", "1", "--gen-epochs", "1", "--users", "10", "--max-steps", "5", "--budget", "0.2",
           "--threads", "1", "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_demo_trains_serves_and_reports_then_reuses_its_model(shared_data, tmp_path):
    first = _demo(shared_data, tmp_path / "demo")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[1/3] `paramcast train`" in first.stdout
    assert "gain from fresh bundles (always - never): NDCG@10" in first.stdout
    assert "bytes per device:" in first.stdout
    report_line = next(line for line in first.stdout.splitlines() if line.startswith("report: "))
    report = json.loads(Path(report_line.split(": ", 1)[1]).read_text())
    assert report["mode"] == "network" and report["network"]["started_server"]
    names = [p["name"] for p in report["policies"]]
    assert names[:4] == ["never", "always", "every-k:k=5", "random-p:p=0.2"] and "ideal:rate=0.2" in names
    assert all(p["network"]["failures"] == 0 for p in report["policies"])
    plots = [line.split(": ", 1)[1].strip() for line in first.stdout.splitlines() if line.startswith("plot:")]
    assert len(plots) == 2 and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert (tmp_path / "demo" / "model" / "package" / "manifest.json").is_file()

    again = _demo(shared_data, tmp_path / "demo", "--budget", "0.1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing the model" in again.stdout and "every-k:k=10" in again.stdout


def test_demo_names_a_missing_dataset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "paramcast.cli", "demo", "--data", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "holds no ml-100k" in result.stderr

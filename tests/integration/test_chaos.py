"""The chaos suite: device processes with agents against `paramcast serve` on loopback, the server
killed with SIGKILL mid-download (its streams throttled by the download byte rate) and again
mid-run, devices killed mid-download, mid-write and at random moments, and a bad-input load; then
every device's state is checked (paramcast.reliability.chaos). About half a minute."""

from __future__ import annotations

import pytest

from paramcast.reliability.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.integration

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNAUTHENTICATED",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}


def test_devices_survive_killed_servers_killed_devices_and_bad_input(trained_model, tmp_path):
    report = run_chaos(ChaosConfig(model_dir=trained_model, workdir=tmp_path, devices=3, server_restarts=2,
                                   device_kills=1, refresh_seconds=6.0, bad_requests=1200, log=lambda _: None))
    summary = report.summary()
    assert report.problems == [], summary
    faults = report.faults_injected
    assert faults["server_killed_mid_download"] == 1 and faults["server_killed_mid_run"] == 1
    assert faults["device_killed_mid_download"] == 1 and faults["device_killed_mid_write"] == 1
    assert faults["device_killed_at_random"] == 3
    # Every device ends with a verified bundle (each applied bundles after the last restart) ...
    assert report.devices_with_bundle == 3 and report.bundles_lost == 0
    # ... the package it downloaded through cuts and kills, byte for byte the server's ...
    assert report.packages_identical == 3
    # ... and nothing temporary left: the half-written bundle of the mid-write kill was swept.
    assert report.stray_temporaries == [] and report.temporaries_swept >= 1
    assert report.calls_failed_while_server_up == 0, summary  # failures only while the server was down
    assert report.refreshes["applied"] > 0
    # Bad input: every call answered with a documented status, memory flat, no error in the server log.
    assert set(report.bad_input_codes) <= DOCUMENTED, report.bad_input_codes
    assert report.rss_growth_bad_input < 0.10, report.rss_kib
    assert report.server_errors == []

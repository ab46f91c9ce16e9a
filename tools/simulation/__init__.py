"""The simulation harness: real users replayed as devices, policies compared on request rate and quality.

    timelines.py    one device per user, its steps after a warm-up prefix, candidates per step
    cache.py        model outputs every policy shares: behaviour embeddings, bundles per step (wire-encoded)
    replay.py       one policy over all devices, batched step by step; where bundles come from (`Source`)
    network.py      network mode: a gRPC client per device against `paramcast serve`
    calibration.py  offline fitting on validation devices: the IDEAL mapper and gate thresholds
    harness.py      validation and test devices, calibration runs, test replays, the report dictionary
    report.py       the policy table, JSON and plots

Entry points: `paramcast simulate` (tools/commands/simulate.py) and `paramcast demo`.
"""

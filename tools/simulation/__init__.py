"""The simulation harness: real users replayed as devices, policies compared on request rate and quality.

    timelines.py  one device per user, its steps after a warm-up prefix, candidates per step
    cache.py      model outputs every policy shares: behaviour embeddings, bundles per step (wire-encoded)
    replay.py     one policy over all devices, batched step by step; where bundles come from (`Source`)
    network.py    network mode: a gRPC client per device against `paramcast serve`
    harness.py    calibration on validation devices, test replays, the report dictionary
    report.py     the policy table, JSON and plots

Entry points: `paramcast simulate` (tools/commands/simulate.py) and `paramcast demo`.
"""

"""Reliability under faults and hostile input: what the chaos suite and the benchmark run.

    fuzz.py           mutated bundles through decode -> verify -> apply -> score on a real package
    chaos.py          device processes, a server killed and restarted, bad-input load; the report
    device_worker.py  one device process (`python -m paramcast.reliability.device_worker`), no torch

Entry points: tests/integration/test_chaos.py and tests/unit/test_fuzz.py (bounded), and
tools/bench_reliability.py (the long run that writes benchmarks/results/reliability.json).
"""

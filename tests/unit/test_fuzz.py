"""The bundle fuzzer, bounded: mutants of real bundles through decode -> verify -> apply -> score on
the tiny package never crash and are never accepted corrupt (the long run is tools/bench_reliability.py)."""

from __future__ import annotations

import numpy as np
import pytest
from device_fixtures import tiny_package

from paramcast.common.errors import IntegrityError
from paramcast.common.package import DevicePackage
from paramcast.common.serde import decode_bundle, encode_bundle
from paramcast.reliability.fuzz import fuzz_bundles, reseal, seed_bundle
from paramcast.v1 import param_service_pb2 as pb


def test_mutated_bundles_are_refused_with_typed_errors_or_score_finite_numbers():
    report = fuzz_bundles(DevicePackage.load(tiny_package()), n_mutants=1500, seed=11)
    assert report.mutants == 1500
    assert report.crashes == [] and report.accepted_corrupt == []
    # The run reached every stage: refusals at decode and at apply, and accepted mutants that scored.
    assert report.refused["decode+verify"] > 0 and report.refused["apply"] > 0 and report.accepted > 0


def test_reseal_makes_a_changed_message_pass_the_checksum_so_the_checks_behind_it_are_reached():
    package = DevicePackage.load(tiny_package())
    msg = pb.DeltaBundle()
    msg.ParseFromString(encode_bundle(seed_bundle(package, np.random.default_rng(3), "d"), "fp32"))
    msg.device_id = "e"
    with pytest.raises(IntegrityError, match="checksum"):
        decode_bundle(msg.SerializeToString())
    reseal(msg)
    assert decode_bundle(msg.SerializeToString()).device_id == "e"

"""The quality benchmark's carried seeds: a seed measured earlier stands beside fresh ones only when it
was trained the same way."""

import pytest

from paramcast.bench_quality import check_carry


def meta(**train) -> dict:
    return {"device_config": {"hidden": 32}, "generator_config": {"rank": 4}, "cloud_config": {"dropout": 0.5},
            "train_config": {"seed": 42, "resume": True, "gen_epochs": 8, **train}}


def test_a_seed_carried_from_the_same_configuration_is_accepted():
    carried = {"meta": {"command": "earlier", **meta()}}
    check_carry(carried, meta(seed=43, resume=False))  # only what differs from seed to seed


def test_a_seed_carried_from_another_configuration_is_refused_naming_what_differs():
    carried = {"meta": {"command": "earlier", **meta()}}
    fresh = meta(gen_epochs=30)
    fresh["cloud_config"] = {"dropout": 0.2}
    with pytest.raises(SystemExit, match=r"cloud_config\.dropout, train_config\.gen_epochs"):
        check_carry(carried, fresh)

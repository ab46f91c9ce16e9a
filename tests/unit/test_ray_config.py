"""`--engine ray` settings: checked before any cluster is touched, with errors that name the flag."""

from __future__ import annotations

import pytest

from paramcast.cli import main


def test_ray_only_flags_and_what_the_ray_proxy_lacks_are_refused_by_name(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path), "--replicas", "2"]) == 2
    assert "--replicas: only applies with --engine ray" in capsys.readouterr().err
    pytest.importorskip("ray", reason="needs the ray extra")
    for extra, flag in ((["--gzip"], "--gzip"), (["--metrics-port", "0"], "--metrics-port"),
                        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert")):
        assert main(["serve", "--engine", "ray", "--model", str(tmp_path), *extra]) == 2
        assert f"{flag}: Ray Serve's gRPC proxy does not offer it" in capsys.readouterr().err
    assert main(["serve", "--engine", "ray", "--model", str(tmp_path), "--insecure", "--autoscale", "4"]) == 2
    assert "expected MIN:MAX" in capsys.readouterr().err
    # The proxy listens on every interface: credentials, or an explicit --insecure.
    assert main(["serve", "--engine", "ray", "--model", str(tmp_path)]) == 2
    assert "--tokens: Ray Serve's gRPC proxy listens on every interface" in capsys.readouterr().err
    assert main(["serve", "--engine", "ray", "--model", str(tmp_path), "--insecure", "--download-rate", "1e6"]) == 2
    assert "--download-rate: download budgets are not shared across Ray replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--engine", "ray", "--model", str(tmp_path), "--replicas", "2", "--autoscale", "1:2"])


def test_scaling_and_serve_config_args():
    pytest.importorskip("ray", reason="needs the ray extra")
    from paramcast.cloud.service.ray_serve import Scaling, app_builder, parse_autoscale
    from paramcast.common.errors import InvalidInput

    assert parse_autoscale("1:4") == (1, 4)
    for bad in (Scaling(replicas=0), Scaling(autoscale=(3, 2)), Scaling(autoscale=(0, 0)),
                Scaling(gpus_per_replica=-1)):
        with pytest.raises(InvalidInput):
            bad.check()
    with pytest.raises(InvalidInput, match="models"):
        app_builder({"replicas": 2})
    with pytest.raises(InvalidInput, match="unknown keys \\['replica'\\]"):
        app_builder({"models": ["/m"], "replica": 2})
    with pytest.raises(InvalidInput, match="rate_burst"):
        app_builder({"models": ["/m"], "rate_limit": 5, "rate_burst": 0.5})  # the plain server's own check
    app_builder({"models": "/m", "autoscale": "1:3", "max_batch": 32, "rate_limit": 5, "gpus_per_replica": 1})


def test_replica_options_follow_the_flags():
    pytest.importorskip("ray", reason="needs the ray extra")
    from paramcast.cloud.service.core import Limits
    from paramcast.cloud.service.ray_serve import Scaling, replica_options

    fixed = replica_options(Limits(max_batch=32, max_queue=100),
                            Scaling(replicas=3, cpus_per_replica=2, gpus_per_replica=1, grace_s=5))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}  # a GPU per replica: generation on CUDA
    assert fixed["max_ongoing_requests"] >= 32  # Serve batches only what a replica may hold at once
    assert (fixed["max_queued_requests"], fixed["graceful_shutdown_timeout_s"]) == (100, 5)
    auto = replica_options(Limits(max_batch=32), Scaling(autoscale=(0, 4)))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 32}

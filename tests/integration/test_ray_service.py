"""ParamService as a Ray Serve application on a real local Ray cluster (loopback, started and
stopped by the tests), against the plain server: same bundles, same status codes, same limits,
and a replica killed mid-run costs no call the client's retry policy does not absorb."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramcast.cloud.service.auth import RateLimiter, TokenAuth
from paramcast.cloud.service.core import Limits
from paramcast.cloud.service.server import ServerThread, load_models
from paramcast.common.data import load_interactions
from paramcast.common.errors import ParamCastError
from paramcast.common.serde import SERVICE_NAME
from paramcast.device.client import AsyncParamClient, ParamClient
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

OPEN, GUARDED = "paramcast", "paramcast-guarded"  # two applications on one cluster: calls name theirs
TOKENS = {f"dev-{i}": f"token-{i}" for i in range(1, 16)}
RATE, BURST = 0.2, 3.0  # per device: three calls at once, then one every five seconds


@pytest.fixture(scope="module")
def ray_apps(ray_cluster, trained_model, tmp_path_factory):
    """Serve on the session cluster with two applications of the trained model: OPEN (no
    credentials, two replicas) and GUARDED (tokens and rate limits, two replicas)."""
    from paramcast.cloud.service import ray_serve

    tokens = tmp_path_factory.mktemp("ray-tokens") / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    port = ray_serve.start()
    scaling = ray_serve.Scaling(replicas=2, cpus_per_replica=0.5, grace_s=2)
    limits = Limits(max_delay_ms=5)
    ray_serve.deploy(ray_serve.ServiceConfig(models=(str(trained_model),), limits=limits, threads=1), scaling,
                     name=OPEN, port=port)
    ray_serve.deploy(ray_serve.ServiceConfig(models=(str(trained_model),), limits=limits, tokens_file=str(tokens),
                                             rate=RATE, burst=BURST, threads=1), scaling, name=GUARDED, port=port)
    yield port
    ray_serve.undeploy(OPEN)
    ray_serve.undeploy(GUARDED)


@pytest.fixture(scope="module")
def registry(trained_model):
    return load_models([trained_model])


@pytest.fixture(scope="module")
def windows(shared_data):
    """Real MovieLens histories cut at random points, oldest item first."""
    log = load_interactions(shared_data / "ml-100k")
    rng = np.random.default_rng(1)
    out = []
    for u in rng.choice(log.n_users, 12, replace=False):
        seq = log.sequences[u]
        out.append(seq[: int(rng.integers(1, len(seq)))].tolist())
    return out


def test_devices_get_the_same_bundles_and_package_as_from_the_plain_server(ray_apps, registry, windows, tmp_path):
    served = registry.models()[0]
    with ServerThread(registry) as plain, \
            ParamClient(f"127.0.0.1:{plain.port}", device_id="d") as direct, \
            ParamClient(f"127.0.0.1:{ray_apps}", device_id="d", application=OPEN) as ray:
        for window in windows:
            for encoding, keep_ratio in (("fp32", 0.0), ("int8", 0.5)):
                a = direct.generate(window, served.model_id, served.version, encoding=encoding, keep_ratio=keep_ratio)
                b = ray.generate(window, served.model_id, served.version, encoding=encoding, keep_ratio=keep_ratio)
                assert (b.bundle.model_id, b.bundle.base_version) == (served.model_id, served.version)
                assert a.bundle.factors.keys() == b.bundle.factors.keys()
                for slot, factors in a.bundle.factors.items():  # batches differ: allow the last float bit
                    for got, want in zip(b.bundle.factors[slot], factors, strict=True):
                        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=slot)
                assert a.bundle.masks.keys() == b.bundle.masks.keys()
                for group, mask in a.bundle.masks.items():
                    np.testing.assert_array_equal(b.bundle.masks[group], mask)
        via_ray = ray.download_package(served.model_id, tmp_path / "ray")  # streamed by a replica
        via_plain = direct.download_package(served.model_id, tmp_path / "plain")
    assert (via_ray.model_id, via_ray.base_version) == (served.model_id, served.version)
    for name in ("manifest.json", "model.onnx"):
        assert (via_ray.path / name).read_bytes() == (via_plain.path / name).read_bytes()


def _outcome(call, *args, **kwargs) -> tuple[str, str]:
    """(status code name, details) of one call; ("OK", "") when it succeeds."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, pb.GenerateResponse)):
            list(result)  # a stream fails while it is read
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _auth(i: int) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer token-{i}"),)


def _probe(target: str, app: tuple, model_id: str, version: str) -> dict:
    """Every documented refusal, once against `target`; each device is used by one case only,
    so rate limits only show where a case asks for them."""
    ok = dict(model_id=model_id, base_version=version, window=[1, 2, 3])
    cases = {
        "no credentials": ({**ok, "device_id": "dev-1"}, ()),
        "unknown token": ({**ok, "device_id": "dev-1"}, (("authorization", "Bearer nope"),)),
        "another device's token": ({**ok, "device_id": "dev-1"}, _auth(2)),
        "stale base version": ({**ok, "device_id": "dev-3", "base_version": "0" * 16}, _auth(3)),
        "unknown model": ({**ok, "device_id": "dev-4", "model_id": "nope"}, _auth(4)),
        "item id out of range": ({**ok, "device_id": "dev-5", "window": [1, 10**9]}, _auth(5)),
        "window too long": ({**ok, "device_id": "dev-6", "window": [1] * 1500}, _auth(6)),
        "bad keep ratio": ({**ok, "device_id": "dev-7", "keep_ratio": 7.0}, _auth(7)),
        "unknown encoding": ({**ok, "device_id": "dev-8", "encoding": 42}, _auth(8)),
        "no device id": ({**ok, "device_id": ""}, _auth(9)),
        "fine": ({**ok, "device_id": "dev-10"}, _auth(10)),
    }
    out: dict = {}
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ParamServiceStub(channel)
        raw = channel.unary_unary(f"/{SERVICE_NAME}/Generate")
        for name, (fields, metadata) in cases.items():
            out[name] = _outcome(stub.Generate, pb.GenerateRequest(**fields), metadata=metadata + app, timeout=10)
        out["malformed bytes"] = _outcome(raw, b"\x0a\xff\xff\xff\xff", metadata=_auth(11) + app, timeout=10)
        out["GetModel offset past the end"] = _outcome(
            stub.GetModel, pb.GetModelRequest(model_id=model_id, offset=10**12), metadata=_auth(11) + app, timeout=10)
        out["GetModel unknown model"] = _outcome(stub.GetModel, pb.GetModelRequest(model_id="nope"),
                                                 metadata=_auth(11) + app, timeout=10)
        out["ListModels without credentials"] = _outcome(stub.ListModels, pb.ListModelsRequest(), metadata=app,
                                                         timeout=10)
        out["ListModels"] = str(stub.ListModels(pb.ListModelsRequest(), metadata=_auth(14) + app, timeout=10))
        huge = pb.GenerateRequest(**{**ok, "device_id": "dev-12", "window": [1000] * 40_000}).SerializeToString()
        out["oversized"] = _outcome(raw, huge, metadata=_auth(12) + app, timeout=10)
        # One device over its rate, whichever replica each call reaches.
        request = pb.GenerateRequest(**{**ok, "device_id": "dev-13"})
        out["rate"] = [_outcome(stub.Generate, request, metadata=_auth(13) + app, timeout=10)[0] for _ in range(5)]
        try:
            stub.Generate(request, metadata=_auth(13) + app, timeout=10)
        except grpc.RpcError as exc:
            out["retry-after-ms"] = int(dict(exc.trailing_metadata() or ()).get("retry-after-ms", 0))
    return out


def test_status_codes_credentials_and_rate_limits_match_the_plain_server(ray_apps, registry):
    served = registry.models()[0]
    with ServerThread(registry, auth=TokenAuth(TOKENS), rates=RateLimiter(RATE, BURST),
                      limits=Limits(max_delay_ms=5)) as plain:
        direct = _probe(f"127.0.0.1:{plain.port}", (), served.model_id, served.version)
    ray = _probe(f"127.0.0.1:{ray_apps}", (("application", GUARDED),), served.model_id, served.version)
    assert direct["no credentials"][0] == "UNAUTHENTICATED" and direct["fine"] == ("OK", "")
    assert direct["GetModel offset past the end"][0] == "OUT_OF_RANGE"
    assert direct["ListModels without credentials"][0] == "UNAUTHENTICATED" and served.version in direct["ListModels"]
    for name, answer in direct.items():
        if name == "oversized":  # gRPC itself words this one on the plain server
            assert ray[name][0] == answer[0] == "RESOURCE_EXHAUSTED"
        elif name != "retry-after-ms":
            assert ray[name] == answer, name  # the same code and message, written by the same core
    assert ray["rate"] == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 2  # BURST across two replicas, not per replica
    assert ray["retry-after-ms"] > 0 and direct["retry-after-ms"] > 0


def test_health_reflection_and_the_application_key(ray_apps):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{ray_apps}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        app = (("application", OPEN),)
        for service in ("", SERVICE_NAME):  # answered by a replica of the application
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=app, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=app, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            next(iter(health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # documented: no Watch through the proxy
        # With two applications on the cluster, a call must say which one it is for.
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "Application" in (info.value.details() or "")
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    with ParamClient(f"127.0.0.1:{ray_apps}", application=GUARDED) as client:
        assert client.check_health()


def _replicas(app: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#ParamService#"))


def test_a_killed_replica_costs_no_failed_call_and_serve_brings_it_back(ray_apps, registry, windows):
    import ray
    from ray import serve

    served = registry.models()[0]
    before = _replicas(OPEN)
    assert len(before) == 2
    stats = {"ok": 0, "in_flight_at_kill": 0, "failures": []}

    async def main() -> None:
        client = AsyncParamClient(f"127.0.0.1:{ray_apps}", application=OPEN, timeout_s=30)
        in_flight = 0
        stop = time.monotonic() + 8.0

        async def device(i: int) -> None:
            nonlocal in_flight
            while time.monotonic() < stop:
                in_flight += 1
                try:
                    await client.generate(windows[i % len(windows)], served.model_id, served.version,
                                          device_id=f"load-{i}")
                    stats["ok"] += 1
                except ParamCastError as exc:
                    stats["failures"].append(repr(exc))
                finally:
                    in_flight -= 1

        async def kill_one() -> None:
            await asyncio.sleep(2.5)
            stats["in_flight_at_kill"] = in_flight
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)

        await asyncio.gather(kill_one(), *(device(i) for i in range(24)))
        await client.close()

    asyncio.run(main())
    assert stats["failures"] == []  # every call lost with the replica was answered UNAVAILABLE and retried
    assert stats["in_flight_at_kill"] > 0 and stats["ok"] > 50
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve replaces the dead replica with a new one
        now = _replicas(OPEN)
        state = serve.status().applications[OPEN].deployments["ParamService"]
        if len(now) == 2 and before[0] not in now and state.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replica not replaced: {_replicas(OPEN)}")
    with ParamClient(f"127.0.0.1:{ray_apps}", device_id="after", application=OPEN) as client:
        for window in windows[:4]:
            client.generate(window, served.model_id, served.version)


def test_serve_command_with_the_ray_engine(serve_process, trained_model, registry, windows, monkeypatch):
    """`paramcast serve --engine ray` starts its own local cluster, serves, and stops it on SIGTERM."""
    pytest.importorskip("ray", reason="needs the ray extra")
    served = registry.models()[0]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the child's cluster is on loopback, like the session's
    proc = serve_process("--engine", "ray", "--model", str(trained_model), "--replicas", "2", "--ray-cpus", "2",
                         "--cpus-per-replica", "0.5", "--threads", "1", "--grace", "2", "--insecure")
    with ParamClient(f"127.0.0.1:{proc.port}", device_id="d") as client, ServerThread(registry) as plain, \
            ParamClient(f"127.0.0.1:{plain.port}", device_id="d") as direct:
        assert client.check_health()  # one application on the cluster: no application key needed
        for window in windows[:3]:
            a = direct.generate(window, served.model_id, served.version, encoding="fp32")
            b = client.generate(window, served.model_id, served.version, encoding="fp32")
            for slot, (fa, _) in a.bundle.factors.items():
                np.testing.assert_allclose(b.bundle.factors[slot][0], fa, rtol=1e-5, atol=1e-6)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=120) == 0, proc.output[-3000:]
    assert "2 replicas" in proc.output

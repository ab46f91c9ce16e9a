"""Real servers on loopback port 0 (in-process and `paramcast serve` subprocesses) and real devices.

Every server a test starts is stopped by a fixture or a context manager, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramcast.cloud.bundles import generate_bundles
from paramcast.cloud.checkpoint import Checkpoint, load_checkpoint
from paramcast.cloud.service.auth import RateLimiter, TokenAuth
from paramcast.cloud.service.core import Limits
from paramcast.cloud.service.interceptor import ErrorInterceptor
from paramcast.cloud.service.server import ServerThread, TlsConfig, load_models
from paramcast.common.data import load_interactions
from paramcast.common.errors import CloudUnavailable, DeviceRateLimited, ParamCastError
from paramcast.common.package import DevicePackage
from paramcast.common.serde import SERVICE_NAME, bundle_from_proto, bundle_to_proto
from paramcast.device.agent import APPLIED, REFUSED, REJECTED, STALE_BASE, UNREACHABLE, DeviceAgent
from paramcast.device.client import AsyncParamClient, ParamClient, RetryPolicy
from paramcast.device.runtime import DeviceRuntime
from paramcast.v1 import param_service_pb2 as pb
from paramcast.v1 import param_service_pb2_grpc as pb_grpc

TOKENS = {"dev-1": "token-1", "dev-2": "token-2"}
FAST_RETRY = dict(retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2),
                  reconnect_backoff_s=(0.05, 0.5))


@pytest.fixture(scope="module")
def registry(trained_model):
    return load_models([trained_model])


@pytest.fixture(scope="module")
def model(trained_model):
    return load_checkpoint(trained_model)


@pytest.fixture(scope="module")
def server(registry):
    """An in-process server with per-device tokens."""
    with ServerThread(registry, auth=TokenAuth(TOKENS), limits=Limits(max_delay_ms=5)) as st:
        yield st


@pytest.fixture(scope="module")
def users(shared_data):
    """Real MovieLens users: (history, candidates = the next true item + 100 random items)."""
    log = load_interactions(shared_data / "ml-100k")
    rng = np.random.default_rng(0)
    out = []
    for u in rng.choice(log.n_users, 4, replace=False):
        seq = log.sequences[u].astype(np.int64)
        candidates = np.concatenate([seq[-1:], rng.integers(1, log.n_items + 1, 100)])
        out.append((seq[:-1], candidates))
    return out


def client_for(port: int, device: str = "dev-1", **kw) -> ParamClient:
    return ParamClient(f"127.0.0.1:{port}", device_id=device, token=TOKENS.get(device), timeout_s=5, **FAST_RETRY,
                       **kw)


def agent_for(root: Path, model, device: str = "dev-1", **kw) -> DeviceAgent:
    return DeviceAgent(root, model.model_id, device_id=device, token=TOKENS.get(device), **kw)


# ---------------------------------------------------------------------------------------------
# The end-to-end parity test
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "keep_ratio"), [("int8", 0.0), ("fp32", 0.0), ("fp16", 0.5)])
def test_device_scores_equal_in_process_generation_plus_onnx_runtime(tmp_path, server, model, trained_model, users,
                                                                     encoding, keep_ratio):
    with client_for(server.port) as client:
        agent = agent_for(tmp_path, model, encoding=encoding, keep_ratio=keep_ratio).open(client)
        # The package arrived whole: the same model bytes the cloud exported.
        assert agent.package.model_bytes == DevicePackage.load(trained_model / "package").model_bytes
        reference = DeviceRuntime(DevicePackage.load(trained_model / "package"))
        for history, candidates in users:
            base = agent.score(history, candidates)
            outcome = agent.refresh(client, history)
            assert outcome.outcome == APPLIED, outcome
            got = agent.score(history, candidates)

            expected_bundle = generate_bundles(model, [history[-model.generator.cfg.window:]],
                                               keep_ratio or None)[0].quantized(encoding)
            reference.apply(expected_bundle)
            expected = reference.score(history, candidates)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
            assert np.abs(got - base).max() > 1e-3, "the delta must change scores for this test to mean anything"
            if keep_ratio:
                assert agent.runtime.active_keep, "a slimming bundle switches to a slimmed session"


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


def test_server_killed_mid_run_device_keeps_serving_and_recovers(tmp_path, serve_process, trained_model, model,
                                                                 users):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    proc = serve_process("--model", str(trained_model), "--port", "0", "--tokens", str(tokens), "--threads", "1")
    (history, candidates), (other, _) = users[0], users[1]
    with client_for(proc.port) as client:
        agent = agent_for(tmp_path / "a", model).open(client)
        never_refreshed = agent_for(tmp_path / "b", model, device="dev-2").open(client)
        base = never_refreshed.score(history, candidates)
        assert agent.refresh(client, history).outcome == APPLIED
        adapted = agent.score(history, candidates)

        proc.kill()  # SIGKILL: no drain, connections reset
        down = agent.refresh(client, other, timeout_s=2)
        assert down.outcome == UNREACHABLE, down
        np.testing.assert_array_equal(agent.score(history, candidates), adapted)  # the last good bundle
        assert never_refreshed.refresh(client, other, timeout_s=2).outcome == UNREACHABLE
        assert never_refreshed.serving == "base"
        np.testing.assert_array_equal(never_refreshed.score(history, candidates), base)
        # A device restarting while the cloud is down comes back with its last good bundle from disk.
        restarted = agent_for(tmp_path / "a", model).open(None)
        assert restarted.serving == "bundle" and restarted.bundle.bundle_id == agent.bundle.bundle_id
        np.testing.assert_array_equal(restarted.score(history, candidates), adapted)

        serve_process("--model", str(trained_model), "--port", str(proc.port), "--tokens", str(tokens),
                      "--threads", "1")
        deadline = time.monotonic() + 30
        while (outcome := agent.refresh(client, other, timeout_s=2)).outcome == UNREACHABLE:
            assert time.monotonic() < deadline, "the device never reconnected"
            time.sleep(0.2)
        assert outcome.outcome == APPLIED, outcome
        assert agent.bundle.bundle_id != restarted.bundle.bundle_id


class CorruptingProxy(pb_grpc.ParamServiceServicer):
    """Forwards to the real server and damages what comes back, as a faulty network or cache might."""

    def __init__(self, upstream: pb_grpc.ParamServiceStub):
        self.upstream, self.mode = upstream, "flip"

    def Generate(self, request, context):
        response = self.upstream.Generate(request, metadata=context.invocation_metadata(), timeout=5)
        if self.mode == "flip":  # one bit of one factor: only the checksum can notice
            data = bytearray(response.bundle.slots[0].a.data)
            data[3] ^= 0x04
            response.bundle.slots[0].a.data = bytes(data)
        elif self.mode == "other_base":  # intact and correctly checksummed, but for another base version
            bundle = bundle_from_proto(response.bundle)
            bundle.base_version = "0123456789abcdef"
            response.bundle.CopyFrom(bundle_to_proto(bundle, "fp32"))
        elif self.mode == "other_device":  # intact and correctly checksummed, but another device's
            bundle = bundle_from_proto(response.bundle)
            bundle.device_id = "dev-2"
            response.bundle.CopyFrom(bundle_to_proto(bundle, "fp32"))
        return response


def test_corrupted_or_foreign_bundles_are_rejected_and_old_parameters_kept(tmp_path, server, model, users):
    upstream = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    proxy_servicer = CorruptingProxy(pb_grpc.ParamServiceStub(upstream))
    proxy = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ParamServiceServicer_to_server(proxy_servicer, proxy)
    proxy_port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    try:
        (history, candidates), (other, _) = users[0], users[1]
        with client_for(server.port) as good, client_for(proxy_port) as bad:
            agent = agent_for(tmp_path, model).open(good)
            assert agent.refresh(good, history).outcome == APPLIED
            held_id, scores = agent.bundle.bundle_id, agent.score(history, candidates)
            stored = agent.store.path.read_bytes()
            for mode, reason in (("flip", "checksum"), ("other_base", "base version"),
                                 ("other_device", "not for this device 'dev-1'")):
                proxy_servicer.mode = mode
                outcome = agent.refresh(bad, other)
                assert outcome.outcome == REJECTED and reason in outcome.detail, outcome
                assert agent.bundle.bundle_id == held_id
                np.testing.assert_array_equal(agent.score(history, candidates), scores)
                assert agent.store.path.read_bytes() == stored
    finally:
        proxy.stop(None)
        upstream.close()


def test_a_bundle_copied_from_another_device_is_refused_at_start_up(tmp_path, server, model, users):
    history, candidates = users[0]
    with client_for(server.port) as one, client_for(server.port, device="dev-2") as two:
        first = agent_for(tmp_path / "one", model).open(one)
        assert first.refresh(one, history).outcome == APPLIED
        assert first.bundle.device_id == "dev-1"
        second = agent_for(tmp_path / "two", model, device="dev-2").open(two)
        base = second.score(history, candidates)
        # dev-1's valid, checksummed bundle file placed in dev-2's store
        second.store.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(first.store.path, second.store.path)
        restarted = agent_for(tmp_path / "two", model, device="dev-2").open(None)
        assert restarted.serving == "base"
        assert "not for this device 'dev-2'" in restarted.store.rejected
        np.testing.assert_array_equal(restarted.score(history, candidates), base)


def test_bad_requests_get_the_documented_status_and_the_server_stays_up(server, model):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ParamServiceStub(channel)
    ok = dict(model_id=model.model_id, base_version=model.base_version, device_id="dev-1", window=[1, 2, 3])
    auth = (("authorization", "Bearer token-1"),)
    cases = [
        ("no credentials", ok, (), grpc.StatusCode.UNAUTHENTICATED),
        ("unknown token", ok, (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ("another device's token", ok, (("authorization", "Bearer token-2"),), grpc.StatusCode.PERMISSION_DENIED),
        ("stale base version", {**ok, "base_version": "0" * 16}, auth, grpc.StatusCode.FAILED_PRECONDITION),
        ("unknown model", {**ok, "model_id": "nope"}, auth, grpc.StatusCode.NOT_FOUND),
        ("item id out of range", {**ok, "window": [1, 10**9]}, auth, grpc.StatusCode.INVALID_ARGUMENT),
        ("window too long", {**ok, "window": [1] * 1500}, auth, grpc.StatusCode.INVALID_ARGUMENT),
        ("bad keep ratio", {**ok, "keep_ratio": 7.0}, auth, grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown encoding", {**ok, "encoding": 42}, auth, grpc.StatusCode.INVALID_ARGUMENT),
        ("no device id", {**ok, "device_id": ""}, auth, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    try:
        for name, fields, metadata, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(**fields), metadata=metadata, timeout=5)
            assert info.value.code() == code, (name, info.value.details())
            assert "Traceback" not in info.value.details()
        # The stale-version answer tells the device what to fetch.
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(**{**ok, "base_version": "0" * 16}), metadata=auth, timeout=5)
        assert model.base_version in info.value.details()

        raw = channel.unary_unary(f"/{SERVICE_NAME}/Generate")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\xff\xff\xff\xff", metadata=auth, timeout=5)  # a length prefix that runs off the end
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid GenerateRequest" in info.value.details()
        huge = pb.GenerateRequest(**{**ok, "window": [1000] * 40_000}).SerializeToString()  # ~80 KiB > 64 KiB
        with pytest.raises(grpc.RpcError) as info:
            raw(huge, metadata=auth, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetModel(pb.GetModelRequest(model_id=model.model_id, offset=10**12), metadata=auth, timeout=5))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetModel(pb.GetModelRequest(model_id=model.model_id), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Still up and serving.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        response = stub.Generate(pb.GenerateRequest(**ok), metadata=auth, timeout=5)
        assert bundle_from_proto(response.bundle).base_version == model.base_version
        metrics = server.server.metrics
        assert metrics.value("paramcast_requests_total", {"method": "Generate", "code": "PERMISSION_DENIED"}) >= 1
        assert metrics.value("paramcast_requests_total", {"method": "GetModel", "code": "OUT_OF_RANGE"}) >= 1
    finally:
        channel.close()


def test_unexpected_errors_become_internal_without_details(caplog):
    class Broken(pb_grpc.ParamServiceServicer):
        async def Generate(self, request, context):
            raise RuntimeError("secret detail: /etc/paramcast/key")

    async def main():
        srv = grpc.aio.server(interceptors=[ErrorInterceptor(SERVICE_NAME)])
        pb_grpc.add_ParamServiceServicer_to_server(Broken(), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.ParamServiceStub(channel).Generate(pb.GenerateRequest(), timeout=5)
                return info.value
        finally:
            await srv.stop(None)

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "incident" in error.details()
    incident = error.details().split("incident ")[1].rstrip(")")
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback stays in the server log


def test_a_client_abandoning_a_stream_is_logged_as_a_cancelled_stream_not_an_error(caplog):
    """A device that stops reading a GetModel stream (it will resume later) is routine: INFO, no
    ERROR with a traceback, counted as CANCELLED."""

    class Endless(pb_grpc.ParamServiceServicer):
        async def GetModel(self, request, context):
            while True:  # far more than flow control lets through before the client stops reading
                yield pb.GetModelResponse(data=b"x" * 65536)

    class Recorder:
        codes: list = []

        def call_finished(self, method, code, seconds):
            self.codes.append((method, code))

    recorder = Recorder()

    async def main():
        srv = grpc.aio.server(interceptors=[ErrorInterceptor(SERVICE_NAME, recorder)])
        pb_grpc.add_ParamServiceServicer_to_server(Endless(), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = pb_grpc.ParamServiceStub(channel).GetModel(pb.GetModelRequest(), timeout=10)
                await stream.read()
                await asyncio.sleep(0.3)  # the server is now blocked on flow control
                stream.cancel()
                for _ in range(50):  # until the server has noticed
                    if recorder.codes:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await srv.stop(None)

    with caplog.at_level("INFO"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any("GetModel stream cancelled by the client" in r.getMessage() for r in caplog.records)
    assert recorder.codes == [("GetModel", grpc.StatusCode.CANCELLED)]


def test_grpcs_failed_send_to_a_client_that_left_is_logged_at_info(caplog):
    """The unary counterpart: gRPC sends a Generate answer after the handler returned, and when the
    device is gone by then (killed, or its deadline passing at that moment: a race the chaos run
    hits, too narrow to stage here) gRPC logs ERROR with a traceback. The record as gRPC writes it:"""
    ErrorInterceptor(SERVICE_NAME)  # every server's interceptor installs the filter
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level("INFO"):
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            grpc_logger.exception("ExecuteBatchError raised in core by servicer method [%s]",
                                  "/paramcast.v1.ParamService/Generate")
        grpc_logger.error("Unexpected [ValueError] raised by servicer method [%s]", "/x")  # a real error stays
    gone, other = caplog.records[-2:]
    assert gone.levelname == "INFO" and gone.exc_info is None
    assert gone.getMessage() == "/paramcast.v1.ParamService/Generate: the client left before its answer could be sent"
    assert other.levelname == "ERROR"


def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(tmp_path, registry, model):
    with ServerThread(registry, auth=TokenAuth(TOKENS), rates=RateLimiter(rate=0.05, burst=2)) as st:
        channel = grpc.insecure_channel(f"127.0.0.1:{st.port}")
        stub = pb_grpc.ParamServiceStub(channel)

        def request(device: str) -> pb.GenerateRequest:
            return pb.GenerateRequest(model_id=model.model_id, base_version=model.base_version, device_id=device,
                                      window=[1])

        auth = (("authorization", "Bearer token-1"),)
        stub.Generate(request("dev-1"), metadata=auth, timeout=5)
        stub.Generate(request("dev-1"), metadata=auth, timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request("dev-1"), metadata=auth, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(info.value.trailing_metadata())["retry-after-ms"]
        assert 1000 < int(hint) <= 20000
        # Another authenticated device has a bucket of its own.
        stub.Generate(request("dev-2"), metadata=(("authorization", "Bearer token-2"),), timeout=5)
        channel.close()
        refused = {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}
        with client_for(st.port) as client:
            with pytest.raises(DeviceRateLimited) as limited:
                client.generate([1], model.model_id, model.base_version)
            assert 1 < limited.value.retry_after_s <= 20  # the server's hint, read from the trailer
            # Two refusals so far (the raw stub's and the client's); the server counts a call just
            # after answering it, so wait for the count to settle.
            deadline = time.monotonic() + 5
            while st.server.metrics.value("paramcast_requests_total", refused) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            agent = agent_for(tmp_path, model).open(client)  # downloads are not counted as requests
            assert agent.refresh(client, [1]).outcome == REFUSED
            # The client honoured the hint: the refresh was refused without reaching the server.
            assert st.server.metrics.value("paramcast_requests_total", refused) == 2


def test_without_tokens_fresh_device_ids_share_their_peers_bucket(registry, model):
    """An unauthenticated device id is only a claim: a caller inventing a new id per call still
    draws from one bucket, its address's."""
    with ServerThread(registry, rates=RateLimiter(rate=0.05, burst=3)) as st:
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            stub = pb_grpc.ParamServiceStub(channel)
            codes = []
            for i in range(12):
                try:
                    stub.Generate(pb.GenerateRequest(model_id=model.model_id, base_version=model.base_version,
                                                     device_id=f"fresh-{i}", window=[1]), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    assert "peer 127.0.0.1 exceeded" in exc.details()
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 9


def test_get_model_is_limited_in_bytes_per_device_and_a_throttled_download_completes(tmp_path, registry, model,
                                                                                   trained_model):
    archive = registry.latest(model.model_id).archive
    rate = len(archive) / 2  # the whole package takes about two seconds at this rate
    with ServerThread(registry, auth=TokenAuth(TOKENS),
                      download_rates=RateLimiter(rate, burst=64 * 1024, unit="bytes")) as st:
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
            stub = pb_grpc.ParamServiceStub(channel)
            got, auth = [], (("authorization", "Bearer token-1"),)
            with pytest.raises(grpc.RpcError) as info:
                for msg in stub.GetModel(pb.GetModelRequest(model_id=model.model_id, chunk_size=16384),
                                         metadata=auth, timeout=10):
                    got.append(msg.data)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert sum(map(len, got)) == 64 * 1024  # one burst, then the stream is cut
            assert "device 'dev-1' exceeded" in info.value.details() and "bytes/s" in info.value.details()
            assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
            # Another device is not held back by dev-1's downloads.
            first = next(iter(stub.GetModel(pb.GetModelRequest(model_id=model.model_id),
                                            metadata=(("authorization", "Bearer token-2"),), timeout=10)))
            assert first.offset == 0 and first.data
        started = time.monotonic()
        with client_for(st.port) as client:  # the client waits as told and resumes until it has everything
            package = client.download_package(model.model_id, tmp_path)
        assert time.monotonic() - started > 1.0  # it really was throttled
    assert package.model_bytes == DevicePackage.load(trained_model / "package").model_bytes


def test_requests_whose_deadline_passes_are_never_computed(registry, model):
    with ServerThread(registry, limits=Limits(max_delay_ms=800, max_batch=64)) as st:
        batcher = st.server.core.batcher
        with ParamClient(f"127.0.0.1:{st.port}", device_id="d", timeout_s=0.2) as client:
            with pytest.raises(CloudUnavailable, match="DEADLINE_EXCEEDED"):
                client.generate([1, 2, 3], model.model_id, model.base_version)
            time.sleep(1.0)  # past the batch's close: a live request would have been computed by now
            assert batcher.items == 0
            fetched = client.generate([1, 2, 3], model.model_id, model.base_version, timeout_s=5)
            assert fetched.bundle.base_version == model.base_version and batcher.items == 1


def test_package_download_resumes_after_an_interruption(tmp_path, server, model, trained_model):
    class Crash(Exception):
        pass

    def crash_after_three(offset: int, total: int) -> None:
        if offset >= 3 * 4096:
            raise Crash

    seen: list[int] = []
    with client_for(server.port) as client:
        with pytest.raises(Crash):
            client.download_package(model.model_id, tmp_path, chunk_size=4096, progress=crash_after_three)
        assert (tmp_path / "downloads" / f"{model.model_id}.part").stat().st_size == 3 * 4096
        package = client.download_package(model.model_id, tmp_path, chunk_size=4096,
                                          progress=lambda offset, total: seen.append(offset))
    total = len(server.server.core.registry.latest(model.model_id).archive)
    # The resumed stream started at byte 3 * 4096: its first chunk ends at 4 * 4096.
    assert seen[0] == 4 * 4096 and seen[-1] == total
    assert package.model_bytes == DevicePackage.load(trained_model / "package").model_bytes
    assert not (tmp_path / "downloads" / f"{model.model_id}.part").exists()


def test_a_new_base_version_is_served_beside_the_old_and_devices_upgrade(tmp_path, trained_model, model, users):
    """Serve v1 only, then v1 + v2 (v2 latest), then v2 only: a v1 device keeps working in the
    middle phase and is told to upgrade in the last."""
    import torch

    from paramcast.cloud.export import export_package

    v1 = load_checkpoint(trained_model)
    with torch.no_grad():
        v1.device_model.item_emb.weight[1:].mul_(1.01)
    # A bundle's version is hashed once, from the weights it was built with: new weights, new bundle.
    v2 = Checkpoint(v1.model_id, v1.device_model, v1.generator, v1.meta)
    assert v2.base_version != model.base_version
    v2_package = export_package(v2, tmp_path / "v2-package")
    history, candidates = users[0]
    with ServerThread(load_models([trained_model])) as old:
        with ParamClient(f"127.0.0.1:{old.port}", device_id="d") as client:
            agent = DeviceAgent(tmp_path / "device", model.model_id, device_id="d").open(client)
    both = load_models([trained_model])
    both.add(v2, v2_package)
    with ServerThread(both) as st, ParamClient(f"127.0.0.1:{st.port}", device_id="d") as client:
        listed = client.list_models()
        assert [(m.model_id, m.base_versions, m.latest_version) for m in listed] == [
            (model.model_id, (model.base_version, v2.base_version), v2.base_version)]
        assert agent.refresh(client, history).outcome == APPLIED  # v1 still served
        assert agent.base_version == model.base_version
    only_v2 = load_models([])
    only_v2.add(v2, v2_package)
    with ServerThread(only_v2) as st, ParamClient(f"127.0.0.1:{st.port}", device_id="d") as client:
        outcome = agent.refresh(client, history)
        assert outcome.outcome == STALE_BASE and v2.base_version in outcome.detail
        assert agent.serving == "bundle"  # still serving what it has
        assert agent.upgrade(client)
        assert agent.base_version == v2.base_version and agent.serving == "base"  # the v1 bundle is refused
        assert agent.refresh(client, history).outcome == APPLIED
        assert not agent.upgrade(client)  # already on the latest: nothing to switch to


# ---------------------------------------------------------------------------------------------
# Server features
# ---------------------------------------------------------------------------------------------


def test_generate_accepts_catalogue_ids_mapped_by_the_package_vocabulary(tmp_path, model, trained_model, users):
    """A window of catalogue ids (the package's items.json) gives the bundle the same window of
    model ids gives; unknown catalogue ids are skipped; mixing both fields is refused."""
    from paramcast.cloud.export import export_package

    assert DevicePackage.load(trained_model / "package").vocabulary is not None  # training records it
    n = model.device_model.cfg.n_items
    skus = [""] + [f"sku-{n + 1 - i}" for i in range(1, n + 1)]  # catalogue ids unlike the model's
    package = DevicePackage.load(export_package(model, tmp_path / "package", item_ids=skus))
    registry = load_models([])
    registry.add(model, package.path)
    history, candidates = users[0]
    catalogue = package.vocabulary.catalogue(history[-20:])
    assert catalogue[0] == f"sku-{n + 1 - int(history[-20])}"
    with ServerThread(registry) as st, ParamClient(f"127.0.0.1:{st.port}", device_id="d", timeout_s=5) as client:
        by_model = client.generate(history[-20:], model.model_id, model.base_version, encoding="fp32")
        by_catalogue = client.generate(catalogue + ["no-such-item"], model.model_id, model.base_version,
                                       encoding="fp32")
        shuffled = client.generate(catalogue[::-1], model.model_id, model.base_version, encoding="fp32")
        for a, b in zip(by_model.bundle.factors.values(), by_catalogue.bundle.factors.values(), strict=True):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        moved = [np.abs(a[1] - b[1]).max() for a, b in zip(by_model.bundle.factors.values(),
                                                           shuffled.bundle.factors.values(), strict=True)]
        assert max(moved) > 0  # the order matters, so the equality above is not vacuous
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.ParamServiceStub(channel).Generate(
                pb.GenerateRequest(model_id=model.model_id, base_version=model.base_version, device_id="d",
                                   window=[1], catalogue_window=["sku-1"]), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "catalogue_window" in info.value.details()


def test_list_models_needs_credentials_when_the_server_does(server, model):
    with client_for(server.port) as client:
        assert [m.model_id for m in client.list_models()] == [model.model_id]
    with ParamClient(f"127.0.0.1:{server.port}", device_id="dev-1", timeout_s=5) as anonymous:
        with pytest.raises(ParamCastError) as info:
            anonymous.list_models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_sigterm_drains_in_flight_calls(serve_process, trained_model, model):
    proc = serve_process("--model", str(trained_model), "--max-delay-ms", "1500", "--max-batch", "64",
                         "--threads", "1")
    result: dict = {}

    def call() -> None:
        with ParamClient(f"127.0.0.1:{proc.port}", device_id="d", timeout_s=20) as client:
            try:
                result["bundle"] = client.generate([1, 2, 3], model.model_id, model.base_version).bundle
            except Exception as exc:  # recorded for the assertion below
                result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)  # the call now waits in the batcher (its batch closes after 1.5 s)
    assert proc.stop(timeout_s=30) == 0
    thread.join(timeout=30)
    assert "error" not in result, result.get("error")
    assert result["bundle"].base_version == model.base_version
    assert "draining in-flight calls" in proc.output


def test_async_client_many_concurrent_devices_share_batches(tmp_path, registry, model, users):
    with ServerThread(registry, limits=Limits(max_delay_ms=20, max_batch=64)) as st:

        async def main():
            async with AsyncParamClient(f"127.0.0.1:{st.port}", timeout_s=10) as client:
                assert await client.check_health()
                calls = [client.generate([i + 1, i + 2], model.model_id, model.base_version, device_id=f"dev-{i}")
                         for i in range(48)]
                fetched = await asyncio.gather(*calls)
                # Devices in network mode: agents sharing the one async client (one channel).
                agents = [await DeviceAgent(tmp_path / f"d{i}", model.model_id, device_id=f"agent-{i}")
                          .open_async(client) for i in range(3)]
                outcomes = await asyncio.gather(*(a.refresh_async(client, users[i][0]) for i, a in enumerate(agents)))
                return fetched, agents, outcomes

        fetched, agents, outcomes = asyncio.run(main())
        assert len({f.bundle.bundle_id for f in fetched}) == 48
        batcher = st.server.core.batcher
        assert batcher.items == 48 + 3 and batcher.batches < 48 / 2  # requests really shared generator passes
        assert st.server.metrics.value("paramcast_batch_size_sum") == 48 + 3
        assert [o.outcome for o in outcomes] == [APPLIED] * 3
        assert all(a.serving == "bundle" for a in agents)


def test_metrics_health_and_reflection(registry, model):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with ServerThread(registry, metrics_port=0) as st:
        with ParamClient(f"127.0.0.1:{st.port}", device_id="d") as client:
            assert client.check_health()
            client.generate([5, 6], model.model_id, model.base_version)
            with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel:
                services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        text = urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'paramcast_requests_total{code="OK",method="Generate"} 1.0' in text
    for name in ("paramcast_request_seconds_bucket", "paramcast_queue_seconds_bucket", "paramcast_batch_size_bucket",
                 "paramcast_bundle_bytes_bucket", 'paramcast_response_bytes_total{method="Generate"}'):
        assert name in text, name


def test_tls_and_gzip(tmp_path, registry, model):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    with ServerThread(registry, tls=TlsConfig.from_files(cert, key), gzip=True) as st:
        with ParamClient(f"localhost:{st.port}", device_id="d", root_certificates=cert.read_bytes(),
                         gzip=True) as client:
            assert client.generate([1, 2], model.model_id, model.base_version).bundle.base_version == model.base_version
        with ParamClient(f"127.0.0.1:{st.port}", device_id="d", timeout_s=1, **FAST_RETRY) as plaintext:
            with pytest.raises(CloudUnavailable):
                plaintext.generate([1, 2], model.model_id, model.base_version)


# ---------------------------------------------------------------------------------------------
# Exposure: what answers without credentials, and the options that protect it
# ---------------------------------------------------------------------------------------------


def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", *ec, "-days", "1", "-subj", "/CN=paramcast-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", ["subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth"]),
                      ("client", ["extendedKeyUsage=clientAuth"])):
        (folder / f"{name}.ext").write_text("\n".join(ext) + "\n")
        run("req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_a_tokenless_server_refuses_addresses_beyond_loopback_unless_told_insecure(registry, caplog):
    from paramcast.cloud.service.server import check_exposure, is_loopback
    from paramcast.common.errors import InvalidInput

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    with pytest.raises(InvalidInput, match="--insecure"):  # refused before anything binds
        ServerThread(registry, host="0.0.0.0").start()
    with pytest.raises(InvalidInput, match="metrics token"):
        check_exposure("127.0.0.1", TokenAuth(None), None, "0.0.0.0", None, insecure=False)
    with caplog.at_level("WARNING", logger="paramcast.service"):
        check_exposure("0.0.0.0", TokenAuth(TOKENS), None, None, None, insecure=False)  # tokens, but plaintext
        check_exposure("0.0.0.0", TokenAuth(None), None, "0.0.0.0", None, insecure=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all("plaintext" in w for w in warnings)
    caplog.clear()
    check_exposure("127.0.0.1", TokenAuth(None), None, "127.0.0.1", None, insecure=False)  # loopback: quiet
    assert not caplog.records


def test_metrics_bind_loopback_and_can_require_a_token(registry):
    with ServerThread(registry, metrics_port=0, metrics_token="scrape-me") as st:
        endpoint = st.server._metrics_http
        assert endpoint.http.server_address[0] == "127.0.0.1"  # not the gRPC host: loopback unless told
        url = f"http://127.0.0.1:{st.server.metrics_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=5)
        assert info.value.code == 401
        wrong = urllib.request.Request(url, headers={"Authorization": "Bearer guess"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(wrong, timeout=5)
        right = urllib.request.Request(url, headers={"Authorization": "Bearer scrape-me"})
        assert b"paramcast_queue_depth" in urllib.request.urlopen(right, timeout=5).read()


def test_mutual_tls_and_metrics_over_https(tmp_path, registry, model):
    import ssl

    pki = make_pki(tmp_path)
    tls = TlsConfig.from_files(pki["server.pem"], pki["server.key"], client_ca=pki["ca.pem"])
    with ServerThread(registry, tls=tls, metrics_port=0) as st:
        target = f"localhost:{st.port}"
        ca = pki["ca.pem"].read_bytes()
        with ParamClient(target, device_id="d", root_certificates=ca, client_certificate=pki["client.pem"].read_bytes(),
                         client_key=pki["client.key"].read_bytes()) as client:
            assert client.generate([1, 2], model.model_id, model.base_version).bundle.device_id == "d"
        with ParamClient(target, device_id="d", root_certificates=ca, timeout_s=2, **FAST_RETRY) as no_cert:
            with pytest.raises(CloudUnavailable):  # the handshake fails: no client certificate
                no_cert.generate([1, 2], model.model_id, model.base_version)

        url = f"https://localhost:{st.server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, timeout=5, context=context)  # metrics need the client certificate too
        context.load_cert_chain(pki["client.pem"], pki["client.key"])
        text = urllib.request.urlopen(url, timeout=5, context=context).read().decode()
        assert 'paramcast_requests_total{code="OK",method="Generate"} 1.0' in text
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)  # no plaintext beside TLS


def test_reflection_can_be_turned_off(registry):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with ServerThread(registry, reflection_enabled=False) as st, ParamClient(f"127.0.0.1:{st.port}") as client:
        assert client.check_health()  # health stays: load balancers need it
        with grpc.insecure_channel(f"127.0.0.1:{st.port}") as channel, pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

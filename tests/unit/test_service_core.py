"""The service logic without sockets: validation, auth, rate limits, model versions, package chunks,
the micro-batcher, and the mapping of typed errors to status codes."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import math
import tarfile
import time

import grpc
import numpy as np
import pytest
import torch
from device_fixtures import RANK, tiny_checkpoint, tiny_package

from paramcast.cloud.bundles import generate_bundles
from paramcast.cloud.checkpoint import Checkpoint
from paramcast.cloud.cloud_model import CloudModel, CloudModelConfig
from paramcast.cloud.generator import build_generator
from paramcast.cloud.service.auth import RateLimiter, TokenAuth
from paramcast.cloud.service.batcher import MicroBatcher
from paramcast.cloud.service.core import GenerateCall, Limits, ServiceCore
from paramcast.cloud.service.registry import ModelRegistry
from paramcast.common.bundle import EncodedBundle
from paramcast.common.errors import (
    DeadlineExpired,
    DeviceRateLimited,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    OutOfRange,
    Overloaded,
    PermissionDenied,
    RateLimited,
    ShuttingDown,
    Unauthenticated,
    VersionMismatch,
)
from paramcast.common.package import DevicePackage, pack_package, unpack_package
from paramcast.common.serde import bundle_from_proto, encoded_to_proto
from paramcast.common.status import status_of
from paramcast.v1 import param_service_pb2 as pb

WINDOW = 10


def with_generator(ckpt: Checkpoint, seed: int = 0) -> Checkpoint:
    """The bundle plus a random generator whose B heads are non-zero (so deltas are not trivially 0)."""
    torch.manual_seed(seed)
    model = ckpt.device_model
    cloud = CloudModel(CloudModelConfig(n_items=model.cfg.n_items, hidden=16, n_blocks=1, ffn_units=16,
                                        max_len=WINDOW))
    gen = build_generator(model, cloud, width=16, rank=RANK)
    with torch.no_grad():
        for head in gen.b_heads.values():
            head.weight.normal_(0, 0.05)
    return Checkpoint(ckpt.model_id, ckpt.device_model, gen.eval())


@pytest.fixture(scope="module")
def v1() -> Checkpoint:
    return with_generator(tiny_checkpoint())


@pytest.fixture(scope="module")
def v2(v1) -> Checkpoint:
    """A second version of the same model id: other device weights, so another base version."""
    device = copy.deepcopy(v1.device_model)
    with torch.no_grad():
        device.item_emb.weight[1:].add_(0.01)
    return Checkpoint(v1.model_id, device, copy.deepcopy(v1.generator))


@pytest.fixture(scope="module")
def registry(v1, v2) -> ModelRegistry:
    reg = ModelRegistry()
    reg.add(v1, tiny_package())
    reg.add(v2)  # exports its package (a few seconds, once per module)
    return reg


def run(coro):
    return asyncio.run(coro)


def call(ckpt: Checkpoint, **kw) -> GenerateCall:
    fields = dict(model_id=ckpt.model_id, base_version=ckpt.base_version, device_id="dev-1", window=[3, 1, 4, 1, 5])
    fields.update(kw)
    return GenerateCall(**fields)


async def _generate(core: ServiceCore, *calls: GenerateCall, metadata=None, deadline=None):
    """The wire messages of the core's answers, converted as the servicer converts them."""
    try:
        encoded = await asyncio.gather(*(core.generate(c, metadata, deadline) for c in calls))
    finally:
        await core.close()
    assert all(isinstance(e, EncodedBundle) for e in encoded)  # the core returns domain types
    return [encoded_to_proto(e) for e in encoded]


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------


def test_generate_matches_in_process_generation_for_each_served_version(registry, v1, v2):
    windows = [[3, 1, 4, 1, 5], list(range(1, 40)), [7]]
    for ckpt in (v1, v2):
        core = ServiceCore(registry)
        got = [bundle_from_proto(m) for m in run(_generate(core, *(call(ckpt, window=w, encoding="fp32")
                                                                   for w in windows)))]
        want = generate_bundles(ckpt, [np.array(w[-WINDOW:]) for w in windows])
        for g, w in zip(got, want, strict=True):
            assert (g.model_id, g.base_version) == (ckpt.model_id, ckpt.base_version)
            assert set(g.factors) == set(w.factors)
            for slot in g.factors:
                np.testing.assert_allclose(g.delta(slot), w.delta(slot), atol=1e-6)
        assert np.abs(got[0].delta("head.up") - got[1].delta("head.up")).max() > 1e-4, "deltas depend on the window"
    assert v1.base_version != v2.base_version


def test_one_generator_pass_serves_every_encoding_asked_for(registry, v1):
    """Devices asking for different encodings share a batch; each gets its own encoding, of its own
    window, with a valid checksum and the ttl applied."""
    windows = [[3, 1, 4, 1, 5], list(range(1, 40)), [7], [9, 9, 2]]
    encodings = ["int8", "fp16", "fp32", "int8"]
    core = ServiceCore(registry, limits=Limits(ttl_ms=60_000))
    msgs = run(_generate(core, *(call(v1, window=w, encoding=e) for w, e in zip(windows, encodings, strict=True))))
    assert core.batcher.batches == 1
    want = generate_bundles(v1, [np.array(w[-WINDOW:]) for w in windows])
    dtypes = {"int8": pb.INT8_ROW_SCALED, "fp16": pb.FLOAT16, "fp32": pb.FLOAT32}

    def close_to(got, ref, encoding) -> bool:
        """Decoded factors within the encoding's rounding of the in-process fp32 factors."""
        for slot in ref.factors:
            for u, v in zip(got.factors[slot], ref.factors[slot], strict=True):
                if encoding == "int8":
                    tol = 0.5 * np.abs(u).max(axis=1, keepdims=True) / 127
                else:
                    tol = 1e-3 * np.abs(v) if encoding == "fp16" else 0.0
                if not (np.abs(u - v) <= tol + 1e-5).all():
                    return False
        return True

    for i, (msg, encoding) in enumerate(zip(msgs, encodings, strict=True)):
        assert {s.a.dtype for s in msg.slots} | {s.b.dtype for s in msg.slots} == {dtypes[encoding]}
        got = bundle_from_proto(msg)  # verifies the checksum
        assert got.expires_at_ms == got.created_at_ms + 60_000
        assert close_to(got, want[i], encoding), encoding
        assert not any(close_to(got, w, encoding) for j, w in enumerate(want) if j != i), "another window's bundle"
    assert len({m.bundle_id for m in msgs}) == 4


def test_latest_version_is_the_last_added(registry, v1, v2):
    assert registry.versions(v1.model_id) == [v1.base_version, v2.base_version]
    assert registry.latest(v1.model_id).version == v2.base_version


def test_keep_ratio_gives_masks_and_zero_gives_none(registry, v1):
    core = ServiceCore(registry)
    slim, plain = (bundle_from_proto(m) for m in run(_generate(core, call(v1, keep_ratio=0.5),
                                                                call(v1, keep_ratio=0.0))))
    assert plain.masks == {}
    assert set(slim.masks) == set(v1.device_model.unit_groups())
    for group, mask in slim.masks.items():
        assert mask.sum() == round(0.5 * len(mask)), group


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "x" * 129}, "device_id"),
        ({"device_id": "dev\n1"}, "device_id"),
        ({"model_id": ""}, "model_id"),
        ({"base_version": ""}, "base_version"),
        ({"encoding": "int4"}, "encoding"),
        ({"keep_ratio": -0.1}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": math.nan}, "keep_ratio"),
        ({"window": [0, 1]}, "window"),
        ({"window": [1, 1683]}, "window"),
        ({"window": [1] * 1025}, "window"),
    ],
)
def test_every_field_is_validated_and_named(registry, v1, change, field):
    core = ServiceCore(registry)
    with pytest.raises(InvalidInput) as info:
        core.admit(call(v1, **change))
    assert info.value.field == field
    assert status_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_window_bound_is_configurable_and_long_windows_are_cut_to_the_generator(registry, v1):
    core = ServiceCore(registry, limits=Limits(max_window_items=50))
    with pytest.raises(InvalidInput, match="at most 50"):
        core.admit(call(v1, window=list(range(1, 52))))
    _, window, _ = core.admit(call(v1, window=list(range(1, 51))))
    assert window.tolist() == list(range(41, 51))  # the most recent WINDOW items
    _, empty, _ = core.admit(call(v1, window=[]))  # a device with no history yet is fine
    assert empty.size == 0


def test_unknown_model_and_unserved_base_version(registry, v1, v2):
    core = ServiceCore(registry)
    with pytest.raises(ModelNotFound, match="not served"):
        core.admit(call(v1, model_id="other-model"))
    with pytest.raises(VersionMismatch) as info:
        core.admit(call(v1, base_version="0123456789abcdef"))
    assert info.value.latest == v2.base_version
    assert v2.base_version in str(info.value) and v1.base_version in str(info.value)
    assert status_of(info.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(ModelNotFound("x")) == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Credentials and rates
# ---------------------------------------------------------------------------------------------


def test_tokens_authenticate_and_authorize_one_device(registry, v1):
    auth = TokenAuth({"dev-1": "tok-1", "dev-2": "sha256:" + hashlib.sha256(b"tok-2").hexdigest()})
    core = ServiceCore(registry, auth=auth)
    bearer = {"authorization": "Bearer tok-1"}
    core.admit(call(v1), bearer)
    core.admit(call(v1, device_id="dev-2"), {"authorization": "Bearer tok-2"})  # hashed entry
    with pytest.raises(Unauthenticated, match="missing"):
        core.admit(call(v1), {})
    with pytest.raises(Unauthenticated, match="unknown"):
        core.admit(call(v1), {"authorization": "Bearer tok-3"})
    with pytest.raises(Unauthenticated, match="Bearer"):
        core.admit(call(v1), {"authorization": "tok-1"})
    with pytest.raises(PermissionDenied, match="dev-2"):
        core.admit(call(v1, device_id="dev-2"), bearer)
    # Credentials come first: an unknown caller learns nothing about models or fields.
    with pytest.raises(Unauthenticated):
        core.admit(call(v1, model_id="no-such-model", window=[0]), {})
    assert status_of(Unauthenticated("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED


def test_tokens_file_is_checked(tmp_path):
    bad = tmp_path / "tokens.json"
    bad.write_text('["not", "a", "map"]')
    with pytest.raises(InvalidInput, match="JSON object"):
        TokenAuth.from_file(bad)
    with pytest.raises(InvalidInput, match="share a token"):
        TokenAuth({"a": "same", "b": "same"})
    with pytest.raises(InvalidInput, match="64 hex"):
        TokenAuth({"a": "sha256:abcd"})
    good = tmp_path / "good.json"
    good.write_text('{"d": "t"}')
    assert TokenAuth.from_file(good).authenticate({"authorization": "Bearer t"}) == "d"
    assert TokenAuth(None).authenticate({}) is None  # authentication off


def test_rate_limiter_is_a_token_bucket_per_device():
    limiter = RateLimiter(rate=2.0, burst=3)
    for _ in range(3):
        limiter.check("a", now=100.0)
    with pytest.raises(DeviceRateLimited) as info:
        limiter.check("a", now=100.0)
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert status_of(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    limiter.check("b", now=100.0)  # other devices are unaffected
    limiter.check("a", now=100.5)  # one token refilled after 1 / rate seconds
    with pytest.raises(RateLimited):
        limiter.check("a", now=100.5)
    RateLimiter(0).check("a")  # disabled


def test_rate_limiter_forgets_idle_devices_beyond_its_bound():
    limiter = RateLimiter(rate=1.0, burst=1, max_devices=10)
    for i in range(100):
        limiter.check(f"d{i}", now=float(i))
    assert len(limiter) == 10


def test_rate_limit_applies_in_generate(registry, v1):
    core = ServiceCore(registry, rates=RateLimiter(rate=0.001, burst=2))
    core.admit(call(v1))
    core.admit(call(v1))
    with pytest.raises(RateLimited):
        core.admit(call(v1))


# ---------------------------------------------------------------------------------------------
# GetModel
# ---------------------------------------------------------------------------------------------


def test_package_chunks_cover_the_archive_and_verify(registry, v1):
    core = ServiceCore(registry)
    chunks = list(core.get_model(v1.model_id, v1.base_version, 0, 5000))
    served = registry.get(v1.model_id, v1.base_version)
    archive = b"".join(c.data for c in chunks)
    assert archive == served.archive
    assert hashlib.sha256(archive).digest() == chunks[0].archive_sha256
    assert [c.offset for c in chunks] == list(range(0, len(archive), 5000))
    assert all(hashlib.sha256(c.data).digest() == c.chunk_sha256 for c in chunks)
    assert {(c.version, c.total_size) for c in chunks} == {(v1.base_version, len(archive))}


def test_package_download_resumes_from_an_offset(registry, v1):
    core = ServiceCore(registry)
    served = registry.get(v1.model_id, v1.base_version)
    tail = list(core.get_model(v1.model_id, v1.base_version, 12345, 0))
    assert tail[0].offset == 12345
    assert b"".join(c.data for c in tail) == served.archive[12345:]
    end = list(core.get_model(v1.model_id, v1.base_version, len(served.archive), 0))
    assert len(end) == 1 and end[0].data == b"" and end[0].total_size == len(served.archive)


def test_package_request_bounds(registry, v1, v2):
    core = ServiceCore(registry)
    total = len(registry.get(v1.model_id, v1.base_version).archive)
    with pytest.raises(OutOfRange) as info:
        core.get_model(v1.model_id, v1.base_version, total + 1, 0)
    assert status_of(info.value) == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(InvalidInput, match="offset"):
        core.get_model(v1.model_id, v1.base_version, -1, 0)
    with pytest.raises(ModelNotFound, match="no version"):
        core.get_model(v1.model_id, "feedfacefeedface", 0, 0)
    latest = next(iter(core.get_model(v1.model_id, "", 0, 0)))
    assert latest.version == v2.base_version  # empty version = the latest
    sizes = {len(c.data) for c in core.get_model(v1.model_id, v1.base_version, 0, 1)}
    assert max(sizes) == core.limits.min_chunk_bytes  # tiny chunk sizes are raised to the floor


def test_archive_is_deterministic_and_unpacks_to_a_verified_package(tmp_path, registry, v1):
    first = pack_package(tiny_package())
    assert first == pack_package(tiny_package()) == registry.get(v1.model_id, v1.base_version).archive
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "model.onnx"]
    assert all(m.isreg() and m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
    path = tmp_path / "archive.tar"
    path.write_bytes(first)
    package = unpack_package(path, tmp_path / "pkg")
    assert package.base_version == v1.base_version
    assert package.model_bytes == DevicePackage.load(tiny_package()).model_bytes


def test_unpack_refuses_unsafe_or_damaged_archives(tmp_path):
    def archive(members: dict[str, bytes], kind=tarfile.REGTYPE) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.type = len(data), kind
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    good = pack_package(tiny_package())
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        flip_at = tar.getmember("model.onnx").offset_data + 100  # inside the model: its sha256 fails
    cases = {
        "traversal": archive({"../evil": b"x"}),
        "absolute": archive({"/etc/evil": b"x"}),
        "nested": archive({"dir/manifest.json": b"{}"}),
        "no manifest": archive({"model.onnx": b"x"}),
        "symlink": archive({"manifest.json": b""}, kind=tarfile.SYMTYPE),
        "truncated": good[: len(good) // 2],
        "bit flip": good[:flip_at] + bytes([good[flip_at] ^ 1]) + good[flip_at + 1:],
        "garbage": b"\x00garbage" * 100,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        with pytest.raises(IntegrityError):
            unpack_package(path, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out-")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# Micro-batcher
# ---------------------------------------------------------------------------------------------


class Recorder:
    """A compute function that records every batch it is given (the batcher's only contract)."""

    def __init__(self, seconds: float = 0.0, fail: Exception | None = None):
        self.batches: list[tuple[object, list]] = []
        self.seconds, self.fail = seconds, fail

    def __call__(self, key, items):
        self.batches.append((key, list(items)))
        if self.seconds:
            time.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail
        return [(key, item) for item in items]


def test_concurrent_requests_share_batches_up_to_max_batch():
    compute = Recorder(seconds=0.01)

    async def main():
        batcher = MicroBatcher(compute, max_batch=8, max_delay_s=0.05)
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(20)))
        await batcher.close()
        return results

    results = run(main())
    assert results == [("k", i) for i in range(20)]  # every caller gets its own result
    sizes = [len(items) for _, items in compute.batches]
    assert sum(sizes) == 20 and max(sizes) == 8
    assert len(sizes) == 3


def test_max_batch_one_disables_batching():
    compute = Recorder()

    async def main():
        batcher = MicroBatcher(compute, max_batch=1, max_delay_s=0.05)
        await asyncio.gather(*(batcher.submit("k", i) for i in range(5)))
        await batcher.close()

    run(main())
    assert [len(items) for _, items in compute.batches] == [1] * 5


def test_keys_are_never_mixed_in_a_batch():
    compute = Recorder()

    async def main():
        batcher = MicroBatcher(compute, max_batch=16, max_delay_s=0.02)
        results = await asyncio.gather(*(batcher.submit(i % 3, i) for i in range(12)))
        await batcher.close()
        return results

    assert run(main()) == [(i % 3, i) for i in range(12)]
    for key, items in compute.batches:
        assert all(i % 3 == key for i in items)


def test_a_lone_request_waits_at_most_max_delay():
    compute = Recorder()

    async def main():
        batcher = MicroBatcher(compute, max_batch=64, max_delay_s=0.05)
        start = time.monotonic()
        await batcher.submit("k", 1)
        elapsed = time.monotonic() - start
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert 0.04 <= elapsed < 0.5


def test_expired_and_abandoned_requests_are_dropped_before_compute():
    compute = Recorder(seconds=0.05)

    async def main():
        batcher = MicroBatcher(compute, max_batch=4, max_delay_s=0.0)
        blocker = asyncio.ensure_future(batcher.submit("k", "first"))  # occupies the worker for 50 ms
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(batcher.submit("k", "doomed", deadline=time.monotonic() + 0.01))
        abandoned = asyncio.ensure_future(batcher.submit("k", "abandoned"))
        alive = asyncio.ensure_future(batcher.submit("k", "alive", deadline=time.monotonic() + 5))
        await asyncio.sleep(0)
        abandoned.cancel()  # the caller went away (gRPC cancels the handler when the client does)
        await blocker
        assert await alive == ("k", "alive")
        with pytest.raises(DeadlineExpired):
            await doomed
        with pytest.raises(DeadlineExpired):  # already past: refused without queueing
            await batcher.submit("k", "late", deadline=time.monotonic() - 1)
        expired = batcher.expired
        await batcher.close()
        return expired

    assert run(main()) == 2
    computed = [item for _, items in compute.batches for item in items]
    assert computed == ["first", "alive"]
    assert status_of(DeadlineExpired("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_failing_batch_fails_each_of_its_callers_and_the_batcher_goes_on():
    compute = Recorder(fail=RuntimeError("boom"))

    async def main():
        batcher = MicroBatcher(compute, max_batch=4, max_delay_s=0.01)
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(3)), return_exceptions=True)
        compute.fail = None
        after = await batcher.submit("k", 9)
        await batcher.close()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == ("k", 9)
    assert status_of(RuntimeError("boom")) is None  # unexpected errors become INTERNAL
    assert status_of(IntegrityError("server-side corruption")) is None


def test_full_queue_and_closed_batcher_refuse_work():
    # Item 0 must still be computing when the batcher closes, however slow the machine is.
    compute = Recorder(seconds=5.0)

    async def main():
        batcher = MicroBatcher(compute, max_batch=1, max_delay_s=0.0, max_queue=2)
        running = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.01)  # item 0 is in compute, the queue is empty
        queued = [asyncio.ensure_future(batcher.submit("k", i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit("k", 3)
        await batcher.close()
        for f in queued:
            with pytest.raises(ShuttingDown):
                await f
        with pytest.raises(ShuttingDown):
            await batcher.submit("k", 4)
        return await asyncio.gather(running, return_exceptions=True)

    (first,) = run(main())
    assert isinstance(first, ShuttingDown)
    assert status_of(ShuttingDown("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED

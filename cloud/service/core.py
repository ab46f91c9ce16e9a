"""The service's logic, callable without sockets: what Generate and GetModel do.

    core = ServiceCore(registry, auth=TokenAuth.from_file("tokens.json"), rates=RateLimiter(5, 10))
    encoded = await core.generate(GenerateCall(model_id, base_version, "device-17", [5, 9, 12]),
                                  metadata={"authorization": "Bearer ..."}, deadline=time.monotonic() + 1)
    # encoded: the EncodedBundle the servicer puts on the wire (common.serde.encoded_to_proto)
    for chunk in core.get_model(model_id, version="", offset=0, chunk_size=0, metadata=...): ...

Every request passes the same steps in the same order: authenticate (no work at all for unknown
callers), authorize the device id, take a rate-limit token, validate every field, resolve the
model and version, and only then queue for the micro-batched generator, whose stacked output is
encoded for the whole batch in one pass (`BundleBatch.encoded`). The core speaks domain types
only; protobuf stays in the servicer and `common.serde`. Each failure is a typed
error (`common.errors`) naming the field at fault; the gRPC layer maps
them to status codes in one place.

Rates are counted per authenticated device, or per peer address when the server runs without
tokens (`auth.rate_key`): Generate calls against `rates`, GetModel bytes against `download_rates`.
A download whose device has used up its byte budget ends, after the chunks already sent, with
RESOURCE_EXHAUSTED and the wait in `retry-after-ms`; the device resumes from what it holds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from paramcast.cloud.bundles import check_window, generate_batch
from paramcast.cloud.service.auth import RateLimiter, TokenAuth, rate_key
from paramcast.cloud.service.batcher import BatchObserver, MicroBatcher
from paramcast.cloud.service.registry import ModelRegistry, ServedModel
from paramcast.common.bundle import EncodedBundle, check_encoding
from paramcast.common.errors import InvalidInput, OutOfRange

MAX_ID_CHARS = 128


@dataclass(frozen=True)
class Limits:
    """Request bounds and batching settings (the CLI flags of `paramcast serve`)."""

    max_window_items: int = 1024  # longer windows are rejected; the generator reads the last `window`
    max_batch: int = 64
    max_delay_ms: float = 2.0
    max_queue: int = 4096
    chunk_bytes: int = 64 * 1024  # GetModel chunk size when the request says 0
    min_chunk_bytes: int = 4 * 1024  # requested sizes are clamped into [min, max]
    max_chunk_bytes: int = 1024 * 1024
    ttl_ms: int = 0  # bundle lifetime; 0 = bundles never expire


@dataclass(frozen=True)
class GenerateCall:
    """A Generate request in domain terms (the servicer fills it from the protobuf message)."""

    model_id: str
    base_version: str
    device_id: str
    window: Sequence[int] = field(default_factory=list)
    encoding: str = "int8"
    keep_ratio: float = 0.0  # 0 = no slimming
    catalogue_window: Sequence[str] = field(default_factory=list)  # the window as catalogue ids


@dataclass(frozen=True)
class ModelListing:
    """One served model id: the base versions Generate accepts (oldest first) and the latest."""

    model_id: str
    base_versions: list[str]
    latest_version: str


@dataclass(frozen=True)
class PackageChunk:
    model_id: str
    version: str
    total_size: int
    archive_sha256: bytes
    offset: int
    data: bytes
    chunk_sha256: bytes


def check_id(field_name: str, value: str, required: bool = True) -> str:
    """A model id, version or device id: printable text of at most MAX_ID_CHARS characters."""
    if not isinstance(value, str):
        raise InvalidInput(field_name, f"must be a string, got {type(value).__name__}")
    if not value:
        if required:
            raise InvalidInput(field_name, "is empty")
        return value
    if len(value) > MAX_ID_CHARS:
        raise InvalidInput(field_name, f"is {len(value)} characters long; at most {MAX_ID_CHARS} are accepted")
    if not value.isprintable():
        raise InvalidInput(field_name, "contains control or non-printable characters")
    return value


def check_keep_ratio(value: float) -> float | None:
    """0 -> None (no slimming); otherwise a fraction in (0, 1]."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > 1:
        raise InvalidInput("keep_ratio", f"must be 0 (no slimming) or in (0, 1], got {value}")
    return None if value == 0 or value == 1 else value


class ServiceCore:
    def __init__(self, registry: ModelRegistry, auth: TokenAuth | None = None, rates: RateLimiter | None = None,
                 limits: Limits | None = None, observer: BatchObserver | None = None,
                 download_rates: RateLimiter | None = None):
        if len(registry) == 0:
            raise InvalidInput("models", "a server needs at least one model")
        self.registry = registry
        self.auth = TokenAuth(None) if auth is None else auth
        self.rates = RateLimiter(0) if rates is None else rates  # (a RateLimiter with no devices yet is falsy)
        # GetModel bytes per caller; None = unlimited.
        self.download_rates = RateLimiter(0, unit="bytes") if download_rates is None else download_rates
        self.limits = Limits() if limits is None else limits
        self.batcher = MicroBatcher(self.compute, max_batch=self.limits.max_batch,
                                    max_delay_s=self.limits.max_delay_ms / 1000, max_queue=self.limits.max_queue,
                                    observer=observer)

    # -- Generate -------------------------------------------------------------------------------
    def admit(self, call: GenerateCall, metadata: Mapping[str, str] | None = None, peer: str | None = None,
              ) -> tuple[ServedModel, np.ndarray, float | None]:
        """Every check Generate makes before queueing: -> (model, window to generate from, keep ratio).
        `peer` is the caller's address (rates are counted per peer without tokens)."""
        principal, device_id = self.identify(call, metadata)
        self.rates.check(rate_key(principal, device_id, peer))
        return self.validate(call)

    def identify(self, call: GenerateCall, metadata: Mapping[str, str] | None = None) -> tuple[str | None, str]:
        """Authenticate the caller and authorize the device id the call names -> (principal, device id)."""
        principal = self.auth.authenticate(metadata)
        device_id = check_id("device_id", call.device_id)
        self.auth.authorize(principal, device_id)
        return principal, device_id

    def validate(self, call: GenerateCall) -> tuple[ServedModel, np.ndarray, float | None]:
        """Check every field and resolve the model -> (model, window to generate from, keep ratio)."""
        check_id("model_id", call.model_id)
        check_id("base_version", call.base_version)
        check_encoding(call.encoding)
        keep_ratio = check_keep_ratio(call.keep_ratio)
        served = self.registry.for_base(call.model_id, call.base_version)
        items = self._model_window(call, served) if call.catalogue_window else list(call.window)
        field_name = "catalogue_window" if call.catalogue_window else "window"
        window = check_window(items, served.n_items, self.limits.max_window_items, field_name)
        return served, window[-served.window:], keep_ratio

    def _model_window(self, call: GenerateCall, served: ServedModel) -> np.ndarray:
        """A catalogue-id window mapped through the model's item vocabulary (unknown ids skipped)."""
        if len(call.window):
            raise InvalidInput("catalogue_window", "give window (model item ids) or catalogue_window, not both")
        if served.vocabulary is None:
            raise InvalidInput("catalogue_window", f"model {served.model_id} {served.version} has no item "
                                                   "vocabulary; send model item ids in window")
        if len(call.catalogue_window) > self.limits.max_window_items:
            raise InvalidInput("catalogue_window", f"has {len(call.catalogue_window)} items; at most "
                                                   f"{self.limits.max_window_items} are accepted")
        for i, item in enumerate(call.catalogue_window):
            if len(item.encode()) > MAX_ID_CHARS:
                raise InvalidInput(f"catalogue_window[{i}]", f"is longer than {MAX_ID_CHARS} bytes")
        return served.vocabulary.model_ids(call.catalogue_window)

    async def generate(self, call: GenerateCall, metadata: Mapping[str, str] | None = None,
                       deadline: float | None = None, peer: str | None = None) -> EncodedBundle:
        """One device's bundle, generated in a micro-batch with concurrent calls and encoded as
        `call.encoding`: what the response carries.

        `deadline` is a time.monotonic() value; a request still queued when it passes is dropped
        (DeadlineExpired) without reaching the generator.
        """
        served, window, keep_ratio = self.admit(call, metadata, peer)
        return await self.batcher.submit((served.key, keep_ratio), (window, call.encoding, call.device_id), deadline)

    def compute(self, key: tuple[tuple[str, str], float | None],
                items: list[tuple[np.ndarray, str, str]]) -> list[EncodedBundle]:
        """Runs in the batcher's worker thread: one generator pass for a batch of one model version,
        then one encoding pass over the stacked output, each bundle bound to the device that asked.
        Requests in a batch may ask for different encodings (the encoding is not part of the batch
        key, so it never splits a generator pass)."""
        (model_id, version), keep_ratio = key
        served = self.registry.get(model_id, version)
        batch = generate_batch(served.checkpoint, [window for window, _, _ in items], keep_ratio,
                               torch_device=self.registry.torch_device, ttl_ms=self.limits.ttl_ms)
        return batch.bound_to([device for _, _, device in items]).encoded([enc for _, enc, _ in items])

    # -- ListModels -----------------------------------------------------------------------------
    def list_models(self, metadata: Mapping[str, str] | None = None) -> list[ModelListing]:
        """Every served model id, in id order, with its base versions oldest first."""
        self.auth.authenticate(metadata)
        ids = sorted({m.model_id for m in self.registry.models()})
        return [ModelListing(i, self.registry.versions(i), self.registry.latest(i).version) for i in ids]

    # -- GetModel -------------------------------------------------------------------------------
    def get_model(self, model_id: str, version: str = "", offset: int = 0, chunk_size: int = 0,
                  metadata: Mapping[str, str] | None = None, peer: str | None = None) -> Iterator[PackageChunk]:
        """Validate a package request now, then return the chunks from `offset` to the end, each
        drawn from the caller's download byte budget as it is produced (DeviceRateLimited once
        the budget is spent)."""
        principal = self.auth.authenticate(metadata)
        check_id("model_id", model_id)
        check_id("version", version, required=False)
        if offset < 0:
            raise InvalidInput("offset", f"must be >= 0, got {offset}")
        if chunk_size < 0:
            raise InvalidInput("chunk_size", f"must be >= 0, got {chunk_size}")
        lim = self.limits
        size = lim.chunk_bytes if chunk_size == 0 else min(max(chunk_size, lim.min_chunk_bytes), lim.max_chunk_bytes)
        if self.download_rates.enabled:
            size = max(1, min(size, int(self.download_rates.burst)))  # a chunk never needs more than a full bucket
        served = self.registry.get(model_id, version)
        total = len(served.archive)
        if offset > total:
            raise OutOfRange("offset", f"{offset} is beyond the end of the {total}-byte package of "
                                       f"{model_id} {served.version}")
        return self._chunks(served, offset, size, rate_key(principal, None, peer))

    def _chunks(self, served: ServedModel, offset: int, size: int, caller: str) -> Iterator[PackageChunk]:
        total = len(served.archive)
        view = memoryview(served.archive)
        pos = offset
        while True:
            self.download_rates.take(caller, min(size, total - pos))
            data = bytes(view[pos:pos + size])
            yield PackageChunk(served.model_id, served.version, total, served.archive_sha256, pos, data,
                               hashlib.sha256(data).digest())
            pos += len(data)
            if pos >= total:  # an offset == total request still gets its one empty chunk
                return

    async def close(self) -> None:
        await self.batcher.close()

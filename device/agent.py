"""One device end to end: its package, runtime, last good bundle and the cloud, never blocking on it.

    agent = DeviceAgent("state/", "sasrec-ml-100k", device_id="device-17", token="s3cret")
    agent.open(client)                         # local package if held, else downloaded; last bundle loaded
    agent.score(history, candidates)           # always answers: with the bundle held, else the base model
    outcome = agent.refresh(client, window)    # ask the cloud for a new bundle; never raises for the cloud

State on disk, under ROOT:

    packages/MODEL_ID-VERSION/   the device package (see common/package.py), verified when loaded
    downloads/                   a package download in progress (resumable)
    bundles/MODEL_ID.bundle      the last good bundle (device/store.py: atomic writes)
    current.json                 which package version the device runs

What happens when things go wrong: the cloud unreachable or too slow, a bundle that fails its
checksum, was made for another base version or another device, or has expired, a server that
refuses the request --
in every case `refresh` reports the outcome and the device keeps scoring with what it had. A
server that no longer serves the device's base version answers FAILED_PRECONDITION; `refresh`
reports "stale_base" and `upgrade` fetches the latest package (the old bundle is then refused
for its base version, and the base model serves until the next refresh).

Many agents may share one client (the client takes device_id and token per call), which is how a
simulation holds hundreds of devices over one channel. What talks to the cloud is written once,
for asyncio (`open_async`, `refresh_async`); the blocking `open` and `refresh` run that same code
on the `ParamClient`'s own loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from paramcast.common.bundle import DeltaBundle, check_bundle_for
from paramcast.common.errors import (
    CloudUnavailable,
    IntegrityError,
    InvalidInput,
    ModelNotFound,
    ParamCastError,
    VersionMismatch,
)
from paramcast.common.files import read_regular, sweep_temporaries
from paramcast.common.package import DevicePackage
from paramcast.common.serde import decode_bundle
from paramcast.device.client import AsyncParamClient, Fetched, ParamClient
from paramcast.device.download import package_dir
from paramcast.device.runtime import DeviceRuntime
from paramcast.device.store import BundleStore, write_atomic

log = logging.getLogger("paramcast.device")

C = TypeVar("C", ParamClient, AsyncParamClient)

CURRENT_FILE = "current.json"
MAX_CURRENT_BYTES = 64 * 1024  # current.json is a few dozen bytes

# Outcomes of a refresh.
APPLIED = "applied"  # a new bundle is active and persisted
UNREACHABLE = "unreachable"  # no answer (server down, network, deadline): kept what it had
REJECTED = "rejected"  # an answer that must not be applied (checksum, base version, expiry, shapes)
STALE_BASE = "stale_base"  # the server no longer serves this base version: call upgrade()
REFUSED = "refused"  # the server refused the request (credentials, rate limit, invalid request)


@dataclass(frozen=True)
class Refresh:
    outcome: str
    detail: str = ""
    bundle_id: str | None = None
    response_bytes: int = 0
    seconds: float = 0.0

    @property
    def applied(self) -> bool:
        return self.outcome == APPLIED


class DeviceAgent:
    def __init__(self, root: str | Path, model_id: str, *, device_id: str, token: str | None = None,
                 encoding: str = "int8", keep_ratio: float = 0.0, threads: int = 1):
        self.root, self.model_id = Path(root), model_id
        self.device_id, self.token = device_id, token
        self.encoding, self.keep_ratio, self.threads = encoding, keep_ratio, threads
        self.package: DevicePackage | None = None
        self.runtime: DeviceRuntime | None = None
        self.store: BundleStore | None = None
        self.bundle: DeltaBundle | None = None  # the active bundle; None = base model

    # -- start-up -------------------------------------------------------------------------------
    def open(self, client: ParamClient | None = None) -> DeviceAgent:
        """Load what is held locally; download the package only when there is none (needs `client`)."""
        if self._use_held():
            return self
        return self._needed(client).call(self._download)

    async def open_async(self, client: AsyncParamClient | None = None) -> DeviceAgent:
        if self._use_held():
            return self
        return await self._download(self._needed(client))

    def open_package(self, package: DevicePackage, runtime: DeviceRuntime | None = None) -> DeviceAgent:
        """Run a package the device was given (verified already), with its stored bundle if it fits;
        on `runtime` (a `sibling()` sharing another device's sessions) instead of a new one."""
        self._use(package, runtime)
        return self

    def _use_held(self) -> bool:
        package = self._local_package()
        if package is not None:
            self._use(package)
        return package is not None

    def _needed(self, client: C | None) -> C:
        if client is None:
            raise ModelNotFound(f"no device package for {self.model_id} under {self.root} and no client")
        return client

    async def _download(self, client: AsyncParamClient) -> DeviceAgent:
        self._use(await client.download_package(self.model_id, self.root, token=self.token))
        return self

    def _local_package(self) -> DevicePackage | None:
        sweep_temporaries(self.root)  # current.json's, from a write that was interrupted
        try:
            current = json.loads(read_regular(self.root / CURRENT_FILE, MAX_CURRENT_BYTES))
            return DevicePackage.load(package_dir(self.root, self.model_id, current["version"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IntegrityError, ModelNotFound) as exc:
            log.warning("the held package of %s is unusable (%s); fetching it again", self.model_id, exc)
            return None

    def _use(self, package: DevicePackage, runtime: DeviceRuntime | None = None) -> None:
        """Switch to `package`: a new runtime, its bundle store, and the stored bundle if it fits."""
        if package.model_id != self.model_id:
            raise IntegrityError(f"package {package.path} is for model {package.model_id}, not {self.model_id}")
        if runtime is not None and runtime.package is not package:
            raise InvalidInput("runtime", f"runs package {runtime.package.path}, not {package.path}")
        runtime = runtime or DeviceRuntime(package, threads=self.threads)
        store = BundleStore(self.root / "bundles", package.model_id, package.base_version, decode_bundle,
                            device_id=self.device_id)
        bundle = store.load()  # refuses (and says why) a bundle for another base version or device
        if bundle is not None:
            try:
                runtime.apply(bundle)
            except (InvalidInput, VersionMismatch) as exc:
                store.reject(f"does not fit the package: {exc}")
                bundle = None
        self.package, self.runtime, self.store, self.bundle = package, runtime, store, bundle
        current = {"model_id": package.model_id, "version": package.base_version}
        write_atomic(self.root / CURRENT_FILE, json.dumps(current).encode())
        log.info("device %s runs %s %s with %s", self.device_id, package.model_id, package.base_version,
                 f"bundle {bundle.bundle_id}" if bundle else "the base model")

    # -- serving --------------------------------------------------------------------------------
    @property
    def base_version(self) -> str:
        return self._package().base_version

    @property
    def serving(self) -> str:
        """"bundle" or "base": what `score` uses now."""
        self._drop_expired()
        return "base" if self.bundle is None else "bundle"

    def score(self, history, candidates) -> np.ndarray:
        """Scores from the active bundle, or from the base model when there is none (or it expired)."""
        self._drop_expired()
        assert self.runtime is not None, "open() the agent first"
        return self.runtime.score(history, candidates)

    def serve_base(self) -> None:
        """Serve the base model from now on, as if no bundle had arrived (the stored copy stays)."""
        assert self.runtime is not None, "open() the agent first"
        self.runtime.revert()
        self.bundle = None

    def _drop_expired(self) -> None:
        if self.bundle is not None and self.bundle.is_expired():
            log.info("bundle %s expired; serving the base model", self.bundle.bundle_id)
            assert self.runtime is not None
            self.runtime.revert()
            self.bundle = None

    # -- talking to the cloud -------------------------------------------------------------------
    def refresh(self, client: ParamClient, window: Sequence[int], timeout_s: float | None = None) -> Refresh:
        """Ask for a bundle for `window` and apply it if it is good; keep the current one otherwise."""
        return client.call(lambda aio: self.refresh_async(aio, window, timeout_s))

    async def refresh_async(self, client: AsyncParamClient, window: Sequence[int],
                            timeout_s: float | None = None) -> Refresh:
        package = self._package()
        started = time.perf_counter()
        try:
            fetched = await client.generate(window, package.model_id, package.base_version, encoding=self.encoding,
                                            keep_ratio=self.keep_ratio, device_id=self.device_id, token=self.token,
                                            timeout_s=timeout_s)
        except ParamCastError as exc:
            return self._failed(exc, started)
        return self._accept(fetched)

    def _accept(self, fetched: Fetched) -> Refresh:
        assert self.runtime is not None and self.store is not None
        bundle = fetched.bundle
        try:
            if bundle.is_expired():
                raise IntegrityError(f"bundle {bundle.bundle_id} arrived already expired")
            check_bundle_for(bundle, self.runtime.package.model_id, self.runtime.package.base_version, self.device_id)
            self.runtime.apply(bundle)  # validates shapes against the package; unchanged on error
        except (IntegrityError, VersionMismatch, InvalidInput) as exc:
            log.warning("device %s rejected bundle %s: %s", self.device_id, bundle.bundle_id, exc)
            return Refresh(REJECTED, str(exc), bundle.bundle_id, fetched.response_bytes, fetched.seconds)
        self.bundle = bundle
        try:
            self.store.save(fetched.data)
        except OSError as exc:  # serving goes on with the new bundle; only the restart copy is older
            log.error("device %s could not persist bundle %s: %s", self.device_id, bundle.bundle_id, exc)
        return Refresh(APPLIED, "", bundle.bundle_id, fetched.response_bytes, fetched.seconds)

    def _failed(self, exc: ParamCastError, started: float) -> Refresh:
        seconds = time.perf_counter() - started
        if isinstance(exc, CloudUnavailable):
            outcome = UNREACHABLE
        elif isinstance(exc, IntegrityError):  # bad checksum or structure on arrival
            outcome = REJECTED
        elif isinstance(exc, VersionMismatch):
            # From the server (FAILED_PRECONDITION: base no longer served) or from the local check
            # (the answer names another model or base version than asked for).
            outcome = STALE_BASE if exc.code is not None else REJECTED
        else:
            outcome = REFUSED
        log.log(logging.INFO if outcome == UNREACHABLE else logging.WARNING, "device %s refresh %s: %s",
                self.device_id, outcome, exc)
        return Refresh(outcome, str(exc), seconds=seconds)

    def upgrade(self, client: ParamClient) -> bool:
        """Fetch the latest package if it differs from the one held; True when the device switched."""
        package = client.download_package(self.model_id, self.root, token=self.token)
        if package.base_version == self.base_version:
            return False
        self._use(package)
        return True

    def _package(self) -> DevicePackage:
        if self.package is None:
            raise ModelNotFound("the device has no package yet; call open() first")
        return self.package

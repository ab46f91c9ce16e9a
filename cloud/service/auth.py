"""Per-device credentials and per-device request rates.

Credentials: each call carries `authorization: Bearer <token>` metadata. A tokens file maps device
ids to their tokens, as JSON:

    {"device-17": "s3cret-token", "device-18": "sha256:9f86d081884c7d65..."}

A value starting with `sha256:` is the hex SHA-256 of the token, so the file on the server need
not hold the secrets themselves. An unknown or missing token is UNAUTHENTICATED; a valid token
used for another device id is PERMISSION_DENIED. Without a tokens file the server accepts every
call (for local runs and benchmarks; `paramcast serve` says so in its log).

Rates: a token bucket per caller (`rate` requests -- or bytes, for package downloads -- per
second on average, bursts of up to `burst`), so one chatty device cannot starve the others. The
caller is the device its credentials name; without credentials a device id is only a claim (a
new id would be a new, full bucket), so calls are counted per peer address instead (`rate_key`).
Buckets of callers that went quiet are forgotten beyond `max_devices` (a forgotten one comes back
with a full bucket, which is what it would have had anyway after being idle that long).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from paramcast.common.errors import DeviceRateLimited, InvalidInput, PermissionDenied, Unauthenticated

AUTH_METADATA_KEY = "authorization"
BEARER = "Bearer "


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Token -> device id. `None` tokens (no file) means authentication is off."""

    def __init__(self, tokens: Mapping[str, str] | None):
        self.enabled = tokens is not None
        self._by_digest: dict[bytes, str] = {}
        for device_id, token in (tokens or {}).items():
            if not isinstance(device_id, str) or not device_id or not isinstance(token, str) or not token:
                raise InvalidInput("tokens", f"entry {device_id!r}: device ids and tokens must be non-empty strings")
            if token.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(token[len("sha256:"):])
                except ValueError:
                    raise InvalidInput("tokens", f"entry {device_id!r}: sha256 value is not hex") from None
                if len(digest) != 32:
                    raise InvalidInput("tokens", f"entry {device_id!r}: sha256 value must be 64 hex digits")
            else:
                digest = _digest(token)
            if digest in self._by_digest:
                raise InvalidInput("tokens", f"devices {self._by_digest[digest]!r} and {device_id!r} share a token")
            self._by_digest[digest] = device_id

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        path = Path(path)
        try:
            tokens = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput("tokens", f"{path}: cannot read a JSON object of device id -> token ({exc})") from None
        if not isinstance(tokens, dict):
            raise InvalidInput("tokens", f"{path}: expected a JSON object of device id -> token")
        return cls(tokens)

    def authenticate(self, metadata: Mapping[str, str] | None) -> str | None:
        """The device id the call's credentials belong to (None when authentication is off)."""
        if not self.enabled:
            return None
        value = (metadata or {}).get(AUTH_METADATA_KEY)
        if not value:
            raise Unauthenticated(f"missing credentials: send '{AUTH_METADATA_KEY}: Bearer <token>' metadata")
        if not value.startswith(BEARER):
            raise Unauthenticated(f"'{AUTH_METADATA_KEY}' metadata must be 'Bearer <token>'")
        digest = _digest(value[len(BEARER):])
        # Keyed by the SHA-256 of the token: lookup timing cannot reveal how close a guess was.
        device_id = self._by_digest.get(digest)
        if device_id is None:
            raise Unauthenticated("unknown device token")
        return device_id

    def authorize(self, principal: str | None, device_id: str) -> None:
        """Raise PermissionDenied unless the credentials' device id is the one the request names."""
        if principal is not None and principal != device_id:
            raise PermissionDenied(f"device_id: these credentials are not valid for device {device_id!r}")


def rate_key(principal: str | None, device_id: str | None, peer: str | None) -> str:
    """Whose bucket a call draws from: the authenticated device, else the peer address the call
    came from (an unauthenticated device id costs nothing to change), else the claimed device id
    (in-process callers, which have no peer)."""
    if principal is not None:
        return f"device {principal!r}"
    if peer:
        return f"peer {peer}"
    return f"device {device_id!r}" if device_id else "an unidentified caller"


class RateLimiter:
    """Token buckets per key (see `rate_key`); `rate <= 0` disables limiting. `unit` names what is
    counted ("requests", "bytes") in the refusal's message."""

    def __init__(self, rate: float, burst: float | None = None, max_devices: int = 100_000, unit: str = "requests"):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.unit = unit
        if self.enabled and self.burst < 1:
            raise InvalidInput("rate_burst", f"must be at least 1, got {burst}")
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # device -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str, now: float | None = None) -> None:
        """Take one token for `key` or raise DeviceRateLimited saying when one will be free."""
        self.take(key, 1.0, now)

    def take(self, key: str, amount: float = 1.0, now: float | None = None) -> None:
        """Take `amount` tokens (at most `burst`) for `key`, or raise DeviceRateLimited saying when
        they will be there; a refusal takes nothing."""
        if not self.enabled:
            return
        amount = min(float(amount), self.burst)
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= amount
            self._buckets[key] = (tokens - amount if allowed else tokens, now)
            while len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)  # the caller idle longest
        if not allowed:
            wait = (amount - tokens) / self.rate
            raise DeviceRateLimited(
                f"{key} exceeded {self.rate:g} {self.unit}/s (burst {self.burst:g}); "
                f"retry in {wait * 1000:.0f} ms", retry_after_s=wait)

    def __len__(self) -> int:
        return len(self._buckets)

"""Per-device credentials and per-device request rates.

Credentials: each call carries `authorization: Bearer <token>` metadata. A tokens file maps device
ids to their tokens, as JSON:

    {"device-17": "s3cret-token", "device-18": "sha256:9f86d081884c7d65..."}

A value starting with `sha256:` is the hex SHA-256 of the token, so the file on the server need
not hold the secrets themselves. An unknown or missing token is UNAUTHENTICATED; a valid token
used for another device id is PERMISSION_DENIED. Without a tokens file the server accepts every
call (for local runs and benchmarks; `paramcast serve` says so in its log).

Rates: a token bucket per device id (`rate` requests per second on average, bursts of up to
`burst`), so one chatty device cannot starve the others. Buckets of devices that went quiet are
forgotten beyond `max_devices` (a forgotten device comes back with a full bucket, which is what it
would have had anyway after being idle that long).
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


class RateLimiter:
    """Token buckets per device id; `rate <= 0` disables limiting."""

    def __init__(self, rate: float, burst: float | None = None, max_devices: int = 100_000):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        if self.enabled and self.burst < 1:
            raise InvalidInput("rate_burst", f"must be at least 1, got {burst}")
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # device -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, device_id: str, now: float | None = None) -> None:
        """Take one token for `device_id` or raise DeviceRateLimited saying when one will be free."""
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(device_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[device_id] = (tokens - 1.0, now)
                allowed = True
            else:
                self._buckets[device_id] = (tokens, now)
                allowed = False
            while len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)  # the device idle longest
        if not allowed:
            wait = (1.0 - tokens) / self.rate
            raise DeviceRateLimited(
                f"device {device_id!r} exceeded {self.rate:g} requests/s (burst {self.burst:g}); "
                f"retry in {wait * 1000:.0f} ms", retry_after_s=wait)

    def __len__(self) -> int:
        return len(self._buckets)

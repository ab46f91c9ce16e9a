"""Joining a Ray cluster, or starting a small local one, for `--engine ray` (serve and simulate).

    started = connect(address=None, num_cpus=2)        # local: this host only, no dashboard
    connect(address="auto")                             # the cluster `ray start` runs on this node
    connect(address="ray://head:10001")                 # a remote cluster through Ray Client
    ...
    disconnect()                                        # a local cluster this process started stops too

A local cluster binds its node to 127.0.0.1 when `loopback` (the default), runs no dashboard, and
takes the object store size Ray picks unless `object_store_bytes` says otherwise. Needs the `ray`
extra (`pip install ".[ray]"`).
"""

from __future__ import annotations

import socket

from paramcast.common.errors import InvalidInput


def require_ray():
    """The `ray` module, or an error naming the extra that provides it."""
    try:
        import ray
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise InvalidInput("--engine", "ray needs the ray extra: pip install 'paramcast[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None, loopback: bool = True,
            object_store_bytes: int | None = None) -> bool:
    """Join the cluster at `address`, or start a local one -> True when this call started it."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
             _node_ip_address="127.0.0.1" if loopback else None, log_to_driver=False)
    return True


def disconnect() -> None:
    """Leave the cluster; a local one this process started stops with it."""
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host` now, for servers (Ray's proxies) that cannot bind port 0
    and report back; another process could take it before it is used, which the caller then sees
    as a failure to start."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

"""Joining a Ray cluster, or starting a small local one, for `--engine ray` (serve and simulate).

    started = connect(address=None, num_cpus=2)        # local: this host only, no dashboard
    connect(address="auto")                             # the cluster `ray start` runs on this node
    connect(address="ray://head:10001")                 # a remote cluster through Ray Client
    ...
    disconnect()                                        # a local cluster this process started stops too

A local cluster runs no dashboard and takes the object store size Ray picks unless
`object_store_bytes` says otherwise. With `loopback` (the default) its node, GCS and workers use
127.0.0.1: Ray otherwise replaces a loopback node address with the host's reachable one, except
in the one-host mode it uses on macOS and Windows, which `loopback` turns on. (Serve's gRPC proxy
still listens on every interface: cloud/service/ray_proxy.py.) Needs the `ray` extra
(`pip install ".[ray]"`).
"""

from __future__ import annotations

import os
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
    if loopback:
        os.environ[_ONE_HOST_ENV] = "0"  # for the processes the cluster starts
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported, here already
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
             log_to_driver=False)
    return True


_ONE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a one-host cluster on 127.0.0.1


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

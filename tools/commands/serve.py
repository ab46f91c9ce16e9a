"""`paramcast serve`: run the gRPC service (Generate, GetModel, health, reflection, metrics).

    paramcast serve --model runs/ml-100k [--model runs/ml-100k-v2 ...] [--host 127.0.0.1 --port 0]

Once the server listens it prints one line, `paramcast serve ready on HOST:PORT` (with the port
actually bound, so `--port 0` works for scripts and tests), and serves until SIGTERM or SIGINT,
which drain in-flight calls for up to `--grace` seconds before exiting.

    paramcast serve --engine ray --replicas 2 --model runs/ml-100k --tokens tokens.json   # a local Ray cluster
    paramcast serve --engine ray --autoscale 1:8 --ray-address auto ...                  # the cluster on this node

`--engine ray` serves the same ParamService as a Ray Serve application: replicas behind Serve's
gRPC proxy on PORT, micro-batched with @serve.batch, on GPUs where the cluster has them; without
`--ray-address` it starts a local cluster (no dashboard) for its lifetime. The proxy offers no
TLS, gzip or metrics port of ParamCast's own, and listens on every interface, so it needs
`--tokens` (or `--insecure`) whatever `--host` says (cloud/service/ray_proxy.py says what differs).

Exposure: `--tokens` gate Generate and GetModel; health and reflection on the same port answer
without them (`--no-reflection` turns reflection off), and the metrics port binds `--metrics-host`
(loopback by default) with its own `--metrics-token` and serves HTTPS when TLS is on. Without
`--tokens` the server refuses a non-loopback `--host` unless `--insecure` is given, and it warns
whenever it serves plaintext beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from paramcast.serve_process import METRICS_LINE, READY_LINE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the ParamCast gRPC service", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="checkpoint directory (repeat to serve several versions; the last of a model id is "
                        "the latest). DIR/package is used as its device package when it matches")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 = any free port (default)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics over HTTP on this port (0 = any free port); HTTPS when TLS is on")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics port binds (default 127.0.0.1: scrapers on this machine only)")
    p.add_argument("--metrics-token", metavar="FILE",
                   help="file holding a token every scrape must send as 'Authorization: Bearer <token>'")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the generator runs (auto: CUDA when torch sees a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--max-batch", type=int, default=64, help="largest micro-batch per generator pass")
    p.add_argument("--max-delay-ms", type=float, default=2.0,
                   help="longest a request waits for its batch to fill (milliseconds)")
    p.add_argument("--max-queue", type=int, default=4096, help="requests waiting beyond this are refused")
    p.add_argument("--max-window", type=int, default=1024, help="longest behaviour window accepted (items)")
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="largest request message accepted")
    p.add_argument("--ttl-ms", type=int, default=0, help="bundle lifetime in milliseconds (0 = never expires)")
    p.add_argument("--tokens", metavar="FILE",
                   help="JSON object device id -> token (or 'sha256:<hex>'); without it every caller is accepted")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="PER_S",
                   help="Generate calls per second per device (0 = unlimited); without --tokens, per peer address "
                        "(an unauthenticated device id is only a claim)")
    p.add_argument("--rate-burst", type=float, default=None, help="burst size per device (default: the rate, >= 1)")
    p.add_argument("--download-rate", type=float, default=0.0, metavar="BYTES_PER_S",
                   help="GetModel bytes per second per device, or per peer without --tokens (0 = unlimited); a "
                        "device over it gets RESOURCE_EXHAUSTED with retry-after-ms and resumes")
    p.add_argument("--download-burst", type=float, default=None, metavar="BYTES",
                   help="download burst per device (default: one second's worth, at least 64 KiB)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain; with --tls-key, serve TLS only")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: accept only clients presenting a certificate this CA signed (needs --tls-cert)")
    p.add_argument("--no-reflection", action="store_true", help="do not offer gRPC server reflection")
    p.add_argument("--insecure", action="store_true",
                   help="allow serving without --tokens (or metrics without --metrics-token) on a non-loopback address")
    p.add_argument("--gzip", action="store_true", help="gzip responses for clients that accept it")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight calls on shutdown")
    r = p.add_argument_group("--engine ray")
    r.add_argument("--engine", choices=("grpc", "ray"), default="grpc",
                   help="grpc: this process serves (default); ray: a Ray Serve application")
    scale = r.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, metavar="N", help="replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", default=None, help="let Serve scale between MIN and MAX")
    r.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="join this Ray cluster (auto, HOST:PORT, ray://HOST:10001); default: start a local one")
    r.add_argument("--ray-cpus", type=int, default=None, metavar="N", help="CPUs of a local cluster (default: all)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N")
    r.add_argument("--gpus-per-replica", type=float, default=None, metavar="N",
                   help="GPUs per replica (default: 1 when the cluster has GPUs and --device is not cpu)")
    r.add_argument("--app-name", default="paramcast",
                   help="Serve application name (clients send it as `application` metadata when a cluster "
                        "runs several)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from paramcast.cloud.service.auth import RateLimiter, TokenAuth
    from paramcast.cloud.service.core import Limits
    from paramcast.cloud.service.server import TlsConfig, load_models, resolve_device, start_server
    from paramcast.common.errors import InvalidInput

    log = logging.getLogger("paramcast.serve")
    if args.engine == "ray":
        return run_ray(args)
    for flag in ("replicas", "autoscale", "ray_address", "gpus_per_replica"):
        if getattr(args, flag) is not None:
            raise InvalidInput(f"--{flag.replace('_', '-')}", "only applies with --engine ray")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidInput("--tls-cert/--tls-key", "give both or neither")
    if args.tls_client_ca and not args.tls_cert:
        raise InvalidInput("--tls-client-ca", "mutual TLS needs --tls-cert and --tls-key")
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_window_items=args.max_window, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                    max_queue=args.max_queue, ttl_ms=args.ttl_ms)
    auth = TokenAuth.from_file(args.tokens) if args.tokens else TokenAuth(None)
    if not auth.enabled:
        log.warning("no --tokens file: every caller is accepted (fine on loopback, not on a network)")
    rates = RateLimiter(args.rate_limit, args.rate_burst)
    download_burst = args.download_burst if args.download_burst is not None else max(args.download_rate, 64 * 1024)
    download_rates = RateLimiter(args.download_rate, download_burst, unit="bytes")
    tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    metrics_token = _read_token(args.metrics_token) if args.metrics_token else None
    torch_device = resolve_device(args.device)
    registry = load_models(args.model, torch_device)

    async def main() -> None:
        server, port = await start_server(registry, args.host, args.port, limits=limits, auth=auth, rates=rates,
                                          tls=tls, metrics_port=args.metrics_port, gzip=args.gzip,
                                          max_request_bytes=args.max_request_bytes, torch_device=torch_device,
                                          download_rates=download_rates, metrics_host=args.metrics_host,
                                          metrics_token=metrics_token, reflection_enabled=not args.no_reflection,
                                          insecure=args.insecure)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        models = ", ".join(f"{m.model_id} {m.version}" for m in registry.models())
        transport = "plaintext" if tls is None else "mutual TLS" if tls.client_ca else "TLS"
        log.info("serving %s; generator on %s; %s; %s", models, torch_device, transport,
                 f"metrics on port {server.metrics_port}" if server.metrics_port is not None else "no metrics port")
        if server.metrics_port is not None:
            print(f"{METRICS_LINE}{args.metrics_host}:{server.metrics_port}", flush=True)
        print(f"{READY_LINE}{args.host}:{port}", flush=True)
        await stop.wait()
        log.info("shutting down: draining in-flight calls for up to %.1f s", args.grace)
        await server.stop(args.grace)

    asyncio.run(main())
    return 0


def _read_token(path: str) -> str:
    from pathlib import Path

    from paramcast.common.errors import InvalidInput

    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("--metrics-token", f"{path}: cannot read the token ({exc})") from None
    if not token:
        raise InvalidInput("--metrics-token", f"{path} is empty")
    return token


def run_ray(args: argparse.Namespace) -> int:
    """`--engine ray`: deploy on a Ray cluster, print the ready line, serve until a signal."""
    import dataclasses
    import os
    import threading
    from pathlib import Path

    from paramcast.cloud import ray_cluster
    from paramcast.cloud.service.core import Limits
    from paramcast.cloud.service.ray_proxy import MAX_REQUEST_BYTES_ENV
    from paramcast.common.errors import InvalidInput

    log = logging.getLogger("paramcast.serve")
    for flag, given in (("--tls-cert", args.tls_cert or args.tls_key or args.tls_client_ca), ("--gzip", args.gzip),
                        ("--metrics-port", args.metrics_port is not None)):
        if given:
            raise InvalidInput(flag, "Ray Serve's gRPC proxy does not offer it; terminate TLS in front of the "
                                     "proxy and read Serve's metrics from Ray (docs/scale-out.md)")
    if args.download_rate > 0:
        raise InvalidInput("--download-rate", "download budgets are not shared across Ray replicas; serve packages "
                                              "from `paramcast serve` or leave it at 0 (docs/scale-out.md)")
    if not args.tokens and not args.insecure:
        raise InvalidInput("--tokens", "Ray Serve's gRPC proxy listens on every interface whatever --host says; "
                                       "give --tokens, or --insecure to accept every caller")
    ray = ray_cluster.require_ray()
    from paramcast.cloud.service import ray_serve  # imports Ray Serve

    scaling = ray_serve.Scaling(
        replicas=args.replicas or 1,
        autoscale=ray_serve.parse_autoscale(args.autoscale) if args.autoscale else None,
        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica or 0.0, grace_s=args.grace)
    scaling.check()
    limits = Limits(max_window_items=args.max_window, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                    max_queue=args.max_queue, ttl_ms=args.ttl_ms)
    # Replicas run in other processes (other hosts, even): they get absolute paths.
    config = ray_serve.ServiceConfig(
        models=tuple(str(Path(m).resolve()) for m in args.model), limits=limits,
        tokens_file=str(Path(args.tokens).resolve()) if args.tokens else None,
        rate=args.rate_limit, burst=args.rate_burst, threads=args.threads)
    if not args.tokens:
        log.warning("no --tokens file (--insecure): every caller is accepted, on every interface")
    # The proxies of a cluster started here inherit this process's environment.
    os.environ[MAX_REQUEST_BYTES_ENV] = str(args.max_request_bytes)
    started = ray_cluster.connect(args.ray_address, num_cpus=args.ray_cpus,
                                  loopback=args.host in ("127.0.0.1", "localhost", "::1"))
    try:
        if args.gpus_per_replica is None and args.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1:
            scaling = dataclasses.replace(scaling, gpus_per_replica=1.0)
        if args.device == "cuda" and scaling.gpus_per_replica <= 0:
            raise InvalidInput("--device", "cuda was asked for but the Ray cluster has no GPUs for the replicas")
        port = ray_serve.start(args.port, reflection=not args.no_reflection)
        ray_serve.deploy(config, scaling, name=args.app_name, port=port if started else None)
        log.info("serving %s on Ray: %s, %s GPUs and %s CPUs per replica", ", ".join(config.models),
                 f"autoscaling {scaling.autoscale[0]}..{scaling.autoscale[1]}" if scaling.autoscale
                 else f"{scaling.replicas} replicas", scaling.gpus_per_replica, scaling.cpus_per_replica)
        print(f"{READY_LINE}{args.host}:{port}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        log.info("shutting down: Serve drains replicas for up to %.1f s", args.grace)
        if started:
            ray_serve.shutdown()
        else:
            ray_serve.undeploy(args.app_name)
    finally:
        ray_cluster.disconnect()
    return 0

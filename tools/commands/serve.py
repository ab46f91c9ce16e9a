"""`paramcast serve`: run the gRPC service (Generate, GetModel, health, reflection, metrics).

    paramcast serve --model runs/ml-100k [--model runs/ml-100k-v2 ...] [--host 127.0.0.1 --port 0]

Once the server listens it prints one line, `paramcast serve ready on HOST:PORT` (with the port
actually bound, so `--port 0` works for scripts and tests), and serves until SIGTERM or SIGINT,
which drain in-flight calls for up to `--grace` seconds before exiting.
"""

from __future__ import annotations

import argparse

from paramcast.serve_process import METRICS_LINE, READY_LINE


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the ParamCast gRPC service", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="checkpoint directory (repeat to serve several versions; the last of a model id is "
                        "the latest). DIR/package is used as its device package when it matches")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 = any free port (default)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics over HTTP on this port (0 = any free port)")
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
                   help="Generate calls per second per device (0 = unlimited)")
    p.add_argument("--rate-burst", type=float, default=None, help="burst size per device (default: the rate, >= 1)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain; with --tls-key, serve TLS only")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--gzip", action="store_true", help="gzip responses for clients that accept it")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight calls on shutdown")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    import torch

    from paramcast.cloud.service.auth import RateLimiter, TokenAuth
    from paramcast.cloud.service.core import Limits
    from paramcast.cloud.service.server import TlsConfig, load_models, resolve_device, start_server
    from paramcast.common.errors import InvalidInput

    log = logging.getLogger("paramcast.serve")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidInput("--tls-cert/--tls-key", "give both or neither")
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_window_items=args.max_window, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                    max_queue=args.max_queue, ttl_ms=args.ttl_ms)
    auth = TokenAuth.from_file(args.tokens) if args.tokens else TokenAuth(None)
    if not auth.enabled:
        log.warning("no --tokens file: every caller is accepted (fine on loopback, not on a network)")
    rates = RateLimiter(args.rate_limit, args.rate_burst)
    tls = TlsConfig.from_files(args.tls_cert, args.tls_key) if args.tls_cert else None
    torch_device = resolve_device(args.device)
    registry = load_models(args.model, torch_device)

    async def main() -> None:
        server, port = await start_server(registry, args.host, args.port, limits=limits, auth=auth, rates=rates,
                                          tls=tls, metrics_port=args.metrics_port, gzip=args.gzip,
                                          max_request_bytes=args.max_request_bytes, torch_device=torch_device)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        models = ", ".join(f"{m.model_id} {m.version}" for m in registry.models())
        log.info("serving %s; generator on %s; %s; %s", models, torch_device, "TLS" if tls else "plaintext",
                 f"metrics on port {server.metrics_port}" if server.metrics_port is not None else "no metrics port")
        if server.metrics_port is not None:
            print(f"{METRICS_LINE}{args.host}:{server.metrics_port}", flush=True)
        print(f"{READY_LINE}{args.host}:{port}", flush=True)
        await stop.wait()
        log.info("shutting down: draining in-flight calls for up to %.1f s", args.grace)
        await server.stop(args.grace)

    asyncio.run(main())
    return 0

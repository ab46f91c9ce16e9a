"""Service load benchmark: Generate over loopback gRPC across concurrency, against a bare echo server.

    python tools/bench_service.py [--model runs/ml-100k]                  # a few minutes
    python tools/bench_service.py --soak-only --soak-seconds 600           # the 10-minute soak, added to the JSON

Writes benchmarks/results/service-load.json. What runs, all in one invocation so every ratio
compares numbers taken on the same machine minutes apart:

1. `paramcast serve` (a subprocess, `--threads 1`, micro-batching on) and a closed-loop load
   generator in this process (grpc.aio, N concurrent callers, each sending its next request as
   soon as the previous answer arrives) for every N in the sweep: throughput, p50/p99 latency,
   the server's mean batch size and queue time (from its Prometheus metrics), bytes per bundle.
2. The same sweep against a bare grpc.aio echo server (another subprocess) that answers every
   request with the serialized GenerateResponse of a real bundle: the same request bytes in, the
   same response bytes out, no ParamCast code at all. It is the transport's ceiling here. Each
   concurrency is measured on Generate and then on echo, so both see the same background load.
3. Generate with batching off (`--max-batch 1`) at concurrency 64, then with batching on again:
   `batching_speedup` is the ratio of those two back-to-back runs.
4. A soak at concurrency 64 against a fresh server: failed calls, and the server's resident memory
   sampled every second; `soak_rss_growth` is the RSS at the end over the RSS after the first
   minute (after the first third, for soaks shorter than three minutes), minus one, each end being
   the median of the samples in a 15 s window (RSS jitters by a few percent second to second).

Requests are real behaviour windows: MovieLens 100K users' histories cut at random points.
Both the load generator and the servers share this machine's cores; the JSON records how many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from paramcast.serve_process import ChildProcess, ServeProcess

REPO = Path(__file__).resolve().parents[1]
METHOD = "/paramcast.v1.ParamService/Generate"
DEFAULT_SWEEP = "1,2,4,8,16,32,64,128,256"
ECHO_READY = "echo ready on "


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def start_server(model: Path, max_batch: int, max_delay_ms: float, threads: int, device: str) -> ServeProcess:
    return ServeProcess(["--model", str(model), "--port", "0", "--metrics-port", "0", "--max-batch", str(max_batch),
                         "--max-delay-ms", str(max_delay_ms), "--threads", str(threads), "--device", device,
                         "--max-queue", "100000"], timeout_s=300.0)


def start_echo(payload: Path) -> ChildProcess:
    return ChildProcess([sys.executable, str(Path(__file__).resolve()), "--echo-server", str(payload)],
                        ECHO_READY, timeout_s=300.0)


async def echo_server_main(payload_file: str) -> None:
    """A bare grpc.aio server: the Generate method path, bytes in, a fixed GenerateResponse out."""
    import grpc

    payload = Path(payload_file).read_bytes()

    async def echo(request: bytes, context) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "paramcast.v1.ParamService", {"Generate": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{ECHO_READY}127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Unlabelled-enough samples of the server's metrics: name{labels} -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float, warmup: float,
                      channels: int = 4, on_tick=None) -> dict:
    """N callers, each sending its next request when the previous answer arrives; measured after warm-up."""
    import grpc

    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(min(channels, concurrency))]
    calls = [c.unary_unary(METHOD) for c in chans]  # raw bytes both ways: the client's own cost stays small
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    state = {"measuring": False, "stop": False, "ok": 0, "bytes": 0}

    async def caller(i: int) -> None:
        call = calls[i % len(calls)]
        j = i
        while not state["stop"]:
            request = requests[j % len(requests)]
            j += concurrency
            t0 = time.perf_counter()
            try:
                response = await call(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if state["measuring"]:
                    errors[exc.code().name] += 1
                continue
            if state["measuring"]:
                latencies.append(time.perf_counter() - t0)
                state["ok"] += 1
                state["bytes"] += len(response)

    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    started = time.perf_counter()
    if on_tick is None:
        await asyncio.sleep(seconds)
    else:
        while time.perf_counter() - started < seconds:
            await asyncio.sleep(1.0)
            on_tick(time.perf_counter() - started, state["ok"], sum(errors.values()))
    elapsed = time.perf_counter() - started
    state["measuring"] = False
    state["stop"] = True
    await asyncio.gather(*tasks)
    for c in chans:
        await c.close()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "calls": state["ok"],
        "failed_calls": sum(errors.values()),
        "errors": dict(errors),
        "throughput_per_s": state["ok"] / elapsed,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "mean_response_bytes": state["bytes"] / max(1, state["ok"]),
    }


def run_generate(server: ServeProcess, requests: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    metrics_port = server.metrics_port
    assert metrics_port is not None, "start_server asks for a metrics port"
    before = scrape(metrics_port)
    row = asyncio.run(closed_loop(server.port, requests, concurrency, seconds, warmup))
    after = scrape(metrics_port)
    batches = delta(after, before, "paramcast_batch_size_count")
    queued = delta(after, before, "paramcast_queue_seconds_count")
    bundles = delta(after, before, "paramcast_bundle_bytes_count")
    row.update(
        mean_batch_size=delta(after, before, "paramcast_batch_size_sum") / batches if batches else None,
        mean_queue_ms=1000 * delta(after, before, "paramcast_queue_seconds_sum") / queued if queued else None,
        bytes_per_bundle=delta(after, before, "paramcast_bundle_bytes_sum") / bundles if bundles else None,
    )
    return row


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def quick_model(workdir: Path, data: Path) -> Path:
    """A model with `paramcast train`'s default architecture, trained for one epoch per stage (load
    depends on the architecture, not on how well it was trained)."""
    import torch

    from paramcast.cloud.checkpoint import save_checkpoint
    from paramcast.cloud.export import export_package
    from paramcast.cloud.model import DeviceModelConfig
    from paramcast.cloud.train import TrainConfig, train
    from paramcast.common.data import load_interactions

    torch.set_num_threads(1)
    log = load_interactions(data)
    out = workdir / "model"
    ckpt = train(log, str(out), DeviceModelConfig(n_items=log.n_items),
                   TrainConfig(epochs=1, gen_epochs=1, progress=False, threads=1, valid_users=200))
    save_checkpoint(ckpt, out)
    export_package(ckpt, out / "package")
    return out


def make_requests(model: Path, data: Path, n: int, seed: int = 0) -> tuple[list[bytes], bytes, dict]:
    """n serialized GenerateRequests from real histories, and one real GenerateResponse (the echo payload)."""
    from paramcast.cloud.bundles import generate_bundles
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.common.data import load_interactions
    from paramcast.common.serde import bundle_to_proto, encoding_to_proto
    from paramcast.v1 import param_service_pb2 as pb

    ckpt = load_checkpoint(model)
    assert ckpt.generator is not None
    window = ckpt.generator.cfg.window
    log = load_interactions(data)
    rng = np.random.default_rng(seed)
    requests, windows = [], []
    for i in range(n):
        seq = log.sequences[rng.integers(log.n_users)]
        cut = int(rng.integers(1, len(seq) + 1))
        w = seq[max(0, cut - window):cut].astype(np.int64)
        windows.append(w)
        requests.append(pb.GenerateRequest(
            model_id=ckpt.model_id, base_version=ckpt.base_version, device_id=f"bench-{i % 1024}",
            window=w.tolist(), encoding=encoding_to_proto("int8")).SerializeToString())
    sample = generate_bundles(ckpt, windows[:1])[0]
    payload = pb.GenerateResponse(bundle=bundle_to_proto(sample, "int8")).SerializeToString()
    info = {"model_id": ckpt.model_id, "base_version": ckpt.base_version, "window": window,
            "generator": ckpt.generator.cfg.to_dict(), "generated_parameters_per_bundle":
                ckpt.generator.generated_parameters_per_device(),
            "mean_request_bytes": float(np.mean([len(r) for r in requests])), "response_bytes": len(payload)}
    return requests, payload, info


def in_process(model: Path, data: Path, batch: int, seconds: float, threads: int, device: str) -> dict:
    """Bundles/s of the generator and the codec alone, in this process, at a fixed batch size: the
    work one micro-batch of the service does (generate, then int8-encode every bundle), without
    gRPC, queueing or the event loop. Windows are drawn as `make_requests` draws them."""
    import torch

    from paramcast.cloud.bundles import generate_batch
    from paramcast.cloud.checkpoint import load_checkpoint
    from paramcast.cloud.train import resolve_device
    from paramcast.common.data import load_interactions

    torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    ckpt = load_checkpoint(model, map_location=torch_device)
    assert ckpt.generator is not None
    ckpt.generator.to(torch_device).eval()
    ckpt.device_model.to(torch_device).eval()
    log = load_interactions(data)
    rng = np.random.default_rng(1)
    window = ckpt.generator.cfg.window
    windows = []
    for _ in range(64 * batch):
        seq = log.sequences[rng.integers(log.n_users)]
        cut = int(rng.integers(1, len(seq) + 1))
        windows.append(seq[max(0, cut - window):cut].astype(np.int64))
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        chunk = windows[i:i + batch] if i + batch <= len(windows) else windows[:batch]
        i = (i + batch) % len(windows)
        generate_batch(ckpt, chunk, torch_device=torch_device).encoded("int8")
        done += len(chunk)
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "bundles": done, "seconds": elapsed, "bundles_per_s": done / elapsed,
            "torch_threads": threads, "device": str(torch_device),
            "generator_flops_per_bundle": ckpt.generator.flops_per_bundle(ckpt.device_model.flops_per_user(0))}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def soak(args, model: Path, requests: list[bytes]) -> dict:
    server = start_server(model, args.max_batch, args.max_delay_ms, args.threads, args.device)
    samples: list[tuple[float, int]] = []
    try:
        def tick(t: float, ok: int, failed: int) -> None:
            samples.append((t, server.rss_bytes()))
            if int(t) % 30 == 0:
                print(f"  soak {t:5.0f} s: {ok} calls, {failed} failed, rss {samples[-1][1] / 2**20:.1f} MiB",
                      flush=True)

        row = asyncio.run(closed_loop(server.port, requests, args.soak_concurrency, args.soak_seconds, 1.0,
                                      on_tick=tick))
    finally:
        server.stop()
    # RSS moves by several percent from second to second (allocator arenas of the gRPC and generator
    # threads), so each end of the comparison is the median of a window of samples, not one sample.
    baseline_at = min(60.0, args.soak_seconds / 3)
    window = min(15.0, args.soak_seconds / 6)
    end = samples[-1][0]
    baseline = float(np.median([r for t, r in samples if baseline_at <= t < baseline_at + window]))
    final = float(np.median([r for t, r in samples if t >= end - window]))
    row.update(rss_baseline_at_s=baseline_at, rss_window_s=window, rss_baseline_mib=baseline / 2**20,
               rss_final_mib=final / 2**20, rss_max_mib=max(r for _, r in samples) / 2**20,
               rss_samples_mib=[[round(t, 1), round(r / 2**20, 2)] for t, r in samples])
    return row


def write_soak_only(args, soak_row: dict, info: dict, seconds: float) -> int:
    doc: dict = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "service-load"}
    doc.update(soak_rss_growth=soak_row["rss_final_mib"] / soak_row["rss_baseline_mib"] - 1,
               soak_failed_calls=soak_row["failed_calls"], soak=soak_row)
    doc.setdefault("settings", {}).update(soak_seconds=args.soak_seconds, soak_concurrency=args.soak_concurrency)
    doc.setdefault("model", info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"soak_rss_growth {doc['soak_rss_growth']:.4f}  soak_failed_calls {doc['soak_failed_calls']}  "
          f"({seconds:.0f} s); wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: train a quick one with the default "
                                               "architecture on --data)")
    p.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "ml-100k")
    p.add_argument("--concurrency", default=DEFAULT_SWEEP, help="comma-separated sweep")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--speedup-concurrency", type=int, default=64)
    p.add_argument("--soak-seconds", type=float, default=90.0, help="600 for the full 10-minute soak")
    p.add_argument("--soak-concurrency", type=int, default=64)
    p.add_argument("--soak-only", action="store_true",
                   help="run only the soak and update the soak fields of an existing --out file")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service-load.json")
    p.add_argument("--echo-server", metavar="PAYLOAD", help=argparse.SUPPRESS)  # internal: run the echo server
    args = p.parse_args(argv)
    if args.echo_server:
        asyncio.run(echo_server_main(args.echo_server))
        return 0

    sweep = [int(c) for c in args.concurrency.split(",")]
    t_start = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine skews every figure; record how much there was
    with tempfile.TemporaryDirectory(prefix="paramcast-bench-") as tmp:
        workdir = Path(tmp)
        model = args.model or quick_model(workdir, args.data)
        requests, payload, info = make_requests(model, args.data, 2048)
        payload_file = workdir / "payload.bin"
        payload_file.write_bytes(payload)

        print(f"model {info['model_id']} {info['base_version']}: request ~{info['mean_request_bytes']:.0f} B, "
              f"response {info['response_bytes']} B", flush=True)
        if args.soak_only:
            return write_soak_only(args, soak(args, model, requests), info, time.perf_counter() - t_start)
        # Both servers stay up and each concurrency is measured on one, then at once on the other, so
        # the two numbers of a pair see the same background load (this machine's cores are shared).
        results: dict = {"generate": [], "echo": []}
        server = start_server(model, args.max_batch, args.max_delay_ms, args.threads, args.device)
        echo = start_echo(payload_file)
        try:
            for c in sweep:
                row = run_generate(server, requests, c, args.seconds, args.warmup)
                results["generate"].append(row)
                print(f"generate c={c:4d}: {row['throughput_per_s']:8.1f}/s p50 {row['p50_ms']:7.2f} ms "
                      f"p99 {row['p99_ms']:7.2f} ms batch {row['mean_batch_size'] or 0:5.1f}", flush=True)
                row = asyncio.run(closed_loop(echo.port, requests, c, args.seconds, args.warmup))
                results["echo"].append(row)
                print(f"echo     c={c:4d}: {row['throughput_per_s']:8.1f}/s p50 {row['p50_ms']:7.2f} ms "
                      f"p99 {row['p99_ms']:7.2f} ms", flush=True)
        finally:
            server.stop()
            echo.stop()

        unbatched = start_server(model, 1, args.max_delay_ms, args.threads, args.device)
        try:
            no_batching = run_generate(unbatched, requests, args.speedup_concurrency, args.seconds, args.warmup)
        finally:
            unbatched.stop()
        print(f"generate max-batch 1 c={args.speedup_concurrency}: {no_batching['throughput_per_s']:.1f}/s",
              flush=True)
        # The batched figure again, right after the unbatched one, for the same reason as above.
        server = start_server(model, args.max_batch, args.max_delay_ms, args.threads, args.device)
        try:
            batched_again = run_generate(server, requests, args.speedup_concurrency, args.seconds, args.warmup)
        finally:
            server.stop()
        print(f"generate max-batch {args.max_batch} c={args.speedup_concurrency}: "
              f"{batched_again['throughput_per_s']:.1f}/s", flush=True)

        soak_row = soak(args, model, requests) if args.soak_seconds > 0 else None
        # The same work without the service around it, at the batch size the service reached.
        mean_batch = max(1, round(batched_again["mean_batch_size"] or 1))
        alone = in_process(model, args.data, mean_batch, args.seconds, args.threads, args.device)
        print(f"in-process batch {mean_batch}: {alone['bundles_per_s']:.1f} bundles/s", flush=True)

    echo_by_c = {r["concurrency"]: r for r in results["echo"]}
    best = max(results["generate"], key=lambda r: r["throughput_per_s"])
    doc = {
        "benchmark": "service-load",
        "batching_speedup": batched_again["throughput_per_s"] / no_batching["throughput_per_s"],
        "generate_vs_echo": best["throughput_per_s"] / echo_by_c[best["concurrency"]]["throughput_per_s"],
        "service_vs_in_process": batched_again["throughput_per_s"] / alone["bundles_per_s"],
        "in_process": alone,
        "soak_rss_growth": (soak_row["rss_final_mib"] / soak_row["rss_baseline_mib"] - 1) if soak_row else None,
        "soak_failed_calls": soak_row["failed_calls"] if soak_row else None,
        "definitions": {
            "batching_speedup": f"Generate throughput at concurrency {args.speedup_concurrency} with max batch "
                                f"{args.max_batch} over the same with max batch 1 (measured back to back)",
            "service_vs_in_process": f"Generate throughput at concurrency {args.speedup_concurrency} over the "
                                     "generator + int8 codec in one process at the service's mean batch size "
                                     "there (the service's own overhead; same torch threads)",
            "generate_vs_echo": "Generate throughput at its best concurrency over the echo server's throughput at "
                                "that concurrency (same request and response bytes)",
            "soak_rss_growth": "median server RSS over the last rss_window_s seconds of the soak over the median "
                               "over rss_window_s seconds from rss_baseline_at_s, minus one",
        },
        "best_concurrency": best["concurrency"],
        "best_throughput_per_s": best["throughput_per_s"],
        "echo_best_throughput_per_s": max(r["throughput_per_s"] for r in results["echo"]),
        "bytes_per_bundle": best["bytes_per_bundle"],
        "generate": results["generate"],
        "echo": results["echo"],
        "no_batching": no_batching,
        "batching_on": batched_again,
        "soak": soak_row,
        "settings": {
            "seconds_per_point": args.seconds, "warmup_seconds": args.warmup, "max_batch": args.max_batch,
            "max_delay_ms": args.max_delay_ms, "server_torch_threads": args.threads, "device": args.device,
            "soak_seconds": args.soak_seconds, "soak_concurrency": args.soak_concurrency, "encoding": "int8",
            "client": "grpc.aio closed loop in one process, 4 channels, raw bytes",
        },
        "model": info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_before": load_before[0], "load_average_1m_after": os.getloadavg()[0]},
        "wall_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"batching_speedup {doc['batching_speedup']:.2f}  generate_vs_echo {doc['generate_vs_echo']:.2f}  "
          f"soak_rss_growth {doc['soak_rss_growth']}  soak_failed_calls {doc['soak_failed_calls']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

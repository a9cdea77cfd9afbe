"""Concurrent clients against `esm2cli serve`, with dynamic batching on and off, in one run.

Starts the server twice on the same model and workload (once per mode), sends ``--requests``
single-sequence /predict requests from ``--clients`` concurrent clients, and prints throughput and
p50/p99 latency for each mode, and their ratio.

Then, with ``--engine-ceiling``, runs the same sequences through the engine alone (no HTTP, same
devices and dtype): one sequence per batch, against groups of ``--clients`` sequences planned as
the server plans them. Their ratio is what batching gains in compute on these devices, with the
per-request costs of HTTP left out.

    python benchmarks/serve_bench.py --model esm2_t6_8M --clients 16 --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import httpx

from esm2cli.config import EmbedConfig, ModelConfig, ServeConfig
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.runtime.batching import plan_batches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(args, batching: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "esm2cli", "serve", "-m", args.model, "--load-format", args.load_format,
        "--devices", args.devices, "--dtype", args.dtype, "--port", str(port), "-q",
        "--batching" if batching else "--no-batching", "--max-wait-ms", str(args.max_wait_ms),
        "--cache-size", "0",  # the warm-up's sequences come again: measure the engine, not the cache
    ]  # fmt: skip
    return _launch(cmd, port)


def _launch(cmd: list[str], port: int, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `esm2cli serve` (cmd) and waits up to 5 minutes for /health to answer 200."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy")


async def _load(url: str, seqs: list[str], clients: int) -> tuple[float, list[float]]:
    # aiohttp rather than httpx: the load generator shares the machine's cores with the server,
    # and aiohttp spends several times less CPU per request.
    queue: asyncio.Queue[str] = asyncio.Queue()
    for seq in seqs:
        queue.put_nowait(seq)
    latencies: list[float] = []

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            seq = queue.get_nowait()
            start = time.perf_counter()
            async with http.post(f"{url}/predict", json={"sequence": seq}) as response:
                response.raise_for_status()
                await response.read()
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def _in_process(args, batching: bool):
    """Serves in a thread of this process, each engine batch --fixed-cost-ms longer; returns (stop, url)."""
    import threading

    import uvicorn

    from esm2cli.runtime.engine import build_engine
    from esm2cli.serve.app import create_app
    from esm2cli.serve.connections import uvicorn_config

    model = ModelConfig(model=args.model, load_format=args.load_format, devices=args.devices, dtype=args.dtype)
    serve = ServeConfig(batching=batching, max_wait_ms=args.max_wait_ms, cache_size=0)

    def loader():
        setup = build_engine(model, EmbedConfig())
        for worker in setup.engine._workers:
            embed_batch = worker.replica.embed_batch

            def fixed_cost(seqs, embed_batch=embed_batch):
                time.sleep(args.fixed_cost_ms / 1000)
                return embed_batch(seqs)

            worker.replica.embed_batch = fixed_cost
        return setup

    app = create_app(serve, model, EmbedConfig(), loader=loader)
    server = uvicorn.Server(uvicorn_config(app, serve, host="127.0.0.1", port=0, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        time.sleep(0.1)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=120)

    return stop, url


def _measure(args, batching: bool, seqs: list[str]) -> dict:
    if args.fixed_cost_ms:
        stop, url = _in_process(args, batching)
    else:
        proc, url = _start_server(args, batching)

        def stop() -> None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)

    try:
        asyncio.run(_load(url, seqs[: args.clients], args.clients))  # warm-up
        seconds, latencies = asyncio.run(_load(url, seqs, args.clients))
        batches = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if "batch_size_" in line]
    finally:
        stop()
    quantiles = statistics.quantiles(latencies, n=100)
    count = next(float(x.split()[-1]) for x in batches if x.startswith("esm2cli_batch_size_count"))
    total = next(float(x.split()[-1]) for x in batches if x.startswith("esm2cli_batch_size_sum"))
    return {
        "batching": batching,
        "requests": len(seqs),
        "seconds": seconds,
        "requests_per_s": len(seqs) / seconds,
        "residues_per_s": sum(map(len, seqs)) / seconds,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "mean_batch": total / count,
    }


def _engine_ceiling(args, seqs: list[str]) -> dict:
    """Sequences/s of the engine alone, one sequence per batch and in groups of --clients."""
    from esm2cli.runtime.engine import build_engine

    setup = build_engine(ModelConfig(model=args.model, load_format=args.load_format, devices=args.devices,
                                     dtype=args.dtype), EmbedConfig())  # fmt: skip
    max_tokens = setup.batch.max_tokens
    max_batch = ServeConfig().max_batch_size

    def batches(group: int) -> list[list[str]]:
        out = []
        for start in range(0, len(seqs), group):
            chunk = seqs[start : start + group]
            out += [[chunk[i] for i in rows] for rows in plan_batches(list(map(len, chunk)), max_tokens, max_batch)]
        return out

    def rate(group: int) -> float:
        start = time.perf_counter()
        for future in [setup.engine.submit(batch) for batch in batches(group)]:
            future.result()
        return len(seqs) / (time.perf_counter() - start)

    with setup.engine:
        rate(args.clients)  # warm-up
        single, grouped = rate(1), rate(args.clients)
    return {"single_per_s": single, "grouped_per_s": grouped, "ratio": grouped / single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=400, help="longest synthetic sequence")
    parser.add_argument("--length", type=int, help="every sequence exactly this long (a latency probe)")
    parser.add_argument("--modes", default="on,off", help="dynamic batching on, off or both (on,off)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--engine-ceiling", action="store_true", help="also time the engine alone (no HTTP)")
    parser.add_argument(
        "--fixed-cost-ms", type=float, default=0.0, help="serve in this process, each batch this much longer (a GPU)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.pop("ESM2CLI_MODEL", None)
    longest = args.length or args.max_length
    seqs = [seq for _, seq in synthetic_sequences(args.requests, seed=1, max_length=longest)]
    if args.length:  # the synthetic composition, cut or repeated to the one length
        seqs = [(seq * (args.length // len(seq) + 1))[: args.length] for seq in seqs]
    rows = [_measure(args, mode == "on", seqs) for mode in args.modes.split(",")]
    ceiling = _engine_ceiling(args, seqs) if args.engine_ceiling else None
    if args.json:
        print(json.dumps({"server": rows, "engine_ceiling": ceiling}, indent=2))
        return
    print(
        f"{args.model} ({args.load_format}), {args.devices}, {args.dtype}; {args.clients} clients, "
        f"{args.requests} single-sequence requests, lengths <= {args.max_length}"
        + (f"; a fixed cost of {args.fixed_cost_ms:g} ms an engine batch" if args.fixed_cost_ms else "")
    )
    print(f"{'batching':>9} {'req/s':>8} {'residues/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}")
    for r in rows:
        print(
            f"{'on' if r['batching'] else 'off':>9} {r['requests_per_s']:8.1f} {r['residues_per_s']:11,.0f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['mean_batch']:11.1f}"
        )
    if len(rows) == 2:
        print(f"throughput ratio on/off: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.2f}x")
    if ceiling:
        print(
            f"engine alone, no HTTP: {ceiling['single_per_s']:.1f} sequences/s one at a time, "
            f"{ceiling['grouped_per_s']:.1f} in groups of {args.clients}: {ceiling['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()

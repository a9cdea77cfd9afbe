"""/v1/embeddings against /predict/batch, and API keys on against off, side by side in one run.

Starts two servers on the same model and devices, one with an API key and one without, then sends the
same sequences, in requests of ``--batch`` sequences from ``--clients`` concurrent clients, to
/predict/batch, /v1/embeddings (float) and /v1/embeddings (base64) on each. The rounds interleave every
(server, endpoint) pair in a shuffled order, so that drift on a shared machine falls on all of them alike;
the medians are compared. Beside throughput (wall clock, which other load on a shared machine moves), it
reads the CPU time each server process spent per request from /proc, which such load moves much less. It
also times the key check alone (the only work keys add to a request) against the server's time a request.

    python -m benchmarks.auth_bench --model esm2_t6_8M --sequences 256 --batch 8 --clients 8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import timeit

import aiohttp
import httpx

from benchmarks.serve_bench import _free_port, _launch
from esm2cli.jobs.workload import synthetic_sequences
from esm2cli.serve.auth import KeyChecker

KEY = "bench-key-0123456789abcdef"
ENDPOINTS = ("predict_batch", "v1_float", "v1_base64")


def _start(args, key: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "esm2cli", "serve", "-m", args.model, "--load-format", args.load_format,
        "--devices", args.devices, "--dtype", args.dtype, "--port", str(port), "-q",
        "--max-client-batch", str(max(64, args.batch)), "--cache-size", "0",  # the engine, not the cache
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    if key:
        env["ESM2CLI_API_KEYS"] = key
    return _launch(cmd, port, env)


def _request(endpoint: str, model: str, seqs: list[str]) -> tuple[str, dict]:
    if endpoint == "predict_batch":
        return "/predict/batch", {"sequences": seqs}
    return "/v1/embeddings", {"model": model, "input": seqs, "encoding_format": endpoint.removeprefix("v1_")}


async def _load(url: str, key: str | None, endpoint: str, model: str, batches: list[list[str]], clients: int) -> float:
    """Sequences/s of ``clients`` concurrent clients sending every batch once."""
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path, body = _request(endpoint, model, queue.get_nowait())
            async with http.post(f"{url}{path}", json=body, headers=headers) as response:
                response.raise_for_status()
                await response.read()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return sum(map(len, batches)) / (time.perf_counter() - start)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process and its threads so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _key_check_seconds() -> float:
    """Seconds one key check takes (the header a request carries, against 3 keys)."""
    checker = KeyChecker([KEY, KEY[::-1], KEY.upper()])
    header = f"Bearer {KEY}".encode()
    runs = 20000
    return min(timeit.repeat(lambda: checker.accepts(header), number=runs, repeat=5)) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences a request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=200, help="longest synthetic sequence")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seqs = [seq for _, seq in synthetic_sequences(args.sequences, seed=3, max_length=args.max_length)]
    batches = [seqs[i : i + args.batch] for i in range(0, len(seqs), args.batch)]
    servers = {"keys on": _start(args, KEY), "keys off": _start(args, None)}
    model_id = httpx.get(f"{servers['keys off'][1]}/v1/models").json()["data"][0]["id"]
    rates: dict[tuple[str, str], list[float]] = {(s, e): [] for s in servers for e in ENDPOINTS}
    cpu_ms: dict[tuple[str, str], list[float]] = {(s, e): [] for s in servers for e in ENDPOINTS}
    order = list(rates)
    try:
        for server, endpoint in order:  # warm-up: every path once
            url = servers[server][1]
            asyncio.run(_load(url, KEY if server == "keys on" else None, endpoint, model_id, batches[:4], args.clients))
        for _ in range(args.rounds):
            random.shuffle(order)
            for server, endpoint in order:
                key = KEY if server == "keys on" else None
                proc, url = servers[server]
                cpu_before = _cpu_seconds(proc.pid)
                rate = asyncio.run(_load(url, key, endpoint, model_id, batches, args.clients))
                cpu_ms[server, endpoint].append((_cpu_seconds(proc.pid) - cpu_before) * 1000 / len(batches))
                rates[server, endpoint].append(rate)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    median = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}
    check_s = _key_check_seconds()
    request_s = args.batch / median["keys on", "predict_batch"]  # the server's time per request, amortised
    report = {
        "model": args.model,
        "sequences": len(seqs),
        "residues": sum(map(len, seqs)),
        "batch": args.batch,
        "clients": args.clients,
        "rounds": args.rounds,
        "sequences_per_s": {f"{s} / {e}": v for (s, e), v in median.items()},
        "v1_float_over_predict_batch_keys_on": median["keys on", "v1_float"] / median["keys on", "predict_batch"],
        "v1_base64_over_predict_batch_keys_on": median["keys on", "v1_base64"] / median["keys on", "predict_batch"],
        "keys_on_over_off": {e: median["keys on", e] / median["keys off", e] for e in ENDPOINTS},
        "server_cpu_ms_per_request": {f"{s} / {e}": v for (s, e), v in cpu.items()},
        "cpu_keys_on_over_off": {e: cpu["keys on", e] / cpu["keys off", e] for e in ENDPOINTS},
        "cpu_v1_float_over_predict_batch_keys_on": cpu["keys on", "v1_float"] / cpu["keys on", "predict_batch"],
        "key_check_us": check_s * 1e6,
        "key_check_share_of_request": check_s / request_s,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.model} ({args.load_format}), {args.devices}; {len(seqs)} sequences ({report['residues']:,} residues) "
        f"in requests of {args.batch}, {args.clients} clients, {args.rounds} interleaved rounds (medians)"
    )
    print(
        f"{'endpoint':>16} {'keys on seq/s':>14} {'keys off seq/s':>15} {'on/off':>7} "
        f"{'on CPU ms/req':>14} {'off CPU ms/req':>15} {'CPU on/off':>11}  per-round CPU on/off"
    )
    for e in ENDPOINTS:
        per_round = " ".join(f"{a / b:.3f}" for a, b in zip(cpu_ms["keys on", e], cpu_ms["keys off", e], strict=True))
        print(
            f"{e:>16} {median['keys on', e]:14.1f} {median['keys off', e]:15.1f} "
            f"{report['keys_on_over_off'][e]:7.3f} {cpu['keys on', e]:14.2f} {cpu['keys off', e]:15.2f} "
            f"{report['cpu_keys_on_over_off'][e]:11.3f}  {per_round}"
        )
    print(
        f"keys on: /v1/embeddings float / /predict/batch = {report['v1_float_over_predict_batch_keys_on']:.3f}, "
        f"base64 / /predict/batch = {report['v1_base64_over_predict_batch_keys_on']:.3f}; server CPU a request, "
        f"/v1 float / /predict/batch = {report['cpu_v1_float_over_predict_batch_keys_on']:.3f}"
    )
    print(
        f"the key check alone: {report['key_check_us']:.1f} us a request, "
        f"{report['key_check_share_of_request']:.4%} of the server's {request_s * 1000:.1f} ms a request"
    )


if __name__ == "__main__":
    main()

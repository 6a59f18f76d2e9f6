"""Serving load: concurrent clients against `tunewright serve`, dynamic batching on and off, side by side.

Two servers run the default model (smollm2-135m, zero-shot from a config, or --model RUN) on free
loopback ports: one with batching (--max-batch-size N), one without (--max-batch-size 1). Rounds
alternate between them so both see the same machine load. In each round `--concurrency` clients
send `--requests` chat completions (Alpaca instructions, greedy, `--max-tokens` new tokens) and
each client sends its next request as soon as the previous answer arrives. Bounded in count and
time (`--time-limit` per round stops new requests). Reports requests/s, completion tokens/s,
p50/p99 latency, errors, the largest batch the server ran, and how many answers are identical
with and without batching.

    .venv/bin/python bench/serve_load.py --requests 16 --concurrency 8 --max-tokens 16 --rounds 1 \
        --time-limit 300 --out bench/results/serve_load_avx2.json

`--hostile SECONDS` runs instead one batching server under the hostile mix of
tests/test_serve_hostile.py (half-sent headers and bodies, streams nobody reads, huge and
abandoned /predict, oversize bodies, bad JSON, bad values, next to well-formed requests) for that
long, with the limits below, and reports requests answered, 500s, unexpected statuses, slots still
taken afterwards and /health latency (max, p99).

    .venv/bin/python bench/serve_load.py --hostile 60 --out bench/results/serve_hostile_avx2.json
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
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
TESTS = Path(__file__).resolve().parents[1] / "tests"
# The hostile run's server limits: short timeouts so that each hostile client is dealt with quickly.
# Long enough for a well-formed request queued behind a few model batches on 2 busy CPU cores.
HOSTILE_TIMEOUT_S = 120.0
# /predict stops between model batches, so one batch is the longest a request waits behind a huge
# /predict it did not send: 4 rows x 16 new tokens keeps that short (the default is 16 x 64).
HOSTILE_GENERATION = {"max_new_tokens": 16, "batch_size": 4}
HOSTILE_LIMITS = [
    "--read-timeout", "1", "--send-timeout", "1", "--max-predict-rows", "200",
    "--max-body-bytes", "65536", "--max-concurrent-requests", "16", "--max-connections", "64",
]


def alpaca_prompts(count: int) -> list[str]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    prompts = [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in rows]
    return [prompts[index % len(prompts)] for index in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def zero_shot_config(folder: Path, generation: dict[str, int] | None = None) -> Path:
    """The default model as it is: a config with trainer.type none (no run folder needed)."""
    path = folder / "smollm2.yaml"
    config: dict[str, Any] = {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "instruction"}],
        "output_features": [{"name": "output"}],
        "prompt": {"use_chat_template": True},  # the benchmark sends chat completions
        "trainer": {"type": "none"},
    }
    if generation:
        config["generation"] = generation
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_server(
    source: list[str], max_batch_size: int, wait_ms: float, timeout_s: float, log_path: Path, *extra: str
) -> tuple[Any, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tunewright.cli",
        "--quiet",
        "serve",
        *source,
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-wait-ms",
        str(wait_ms),
        "--request-timeout",
        str(timeout_s),
        *extra,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not come up in 300 s")


async def run_round(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, time_limit_s: float
) -> dict[str, Any]:
    """`concurrency` clients share the prompt list; each sends its next request when its answer is in."""
    results: list[dict[str, Any]] = []
    next_index = iter(range(len(prompts)))
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        for index in next_index:
            if time.perf_counter() - started > time_limit_s:
                return
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompts[index]}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            sent = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                ok, status = response.status_code == 200, response.status_code
                payload = response.json() if ok else {}
            except httpx.HTTPError as error:
                ok, status, payload = False, type(error).__name__, {}
            results.append(
                {
                    "index": index,
                    "ok": ok,
                    "status": status,
                    "latency_s": time.perf_counter() - sent,
                    "tokens": payload.get("usage", {}).get("completion_tokens", 0),
                    "text": payload["choices"][0]["message"]["content"] if ok else None,
                }
            )

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    latencies = sorted(result["latency_s"] for result in results if result["ok"])
    health = httpx.get(f"{url}/health").json()
    return {
        "requests": len(results),
        "errors": sum(not result["ok"] for result in results),
        "error_statuses": sorted({str(result["status"]) for result in results if not result["ok"]}),
        "wall_s": wall_s,
        "requests_per_s": len(latencies) / wall_s,
        "tokens_per_s": sum(result["tokens"] for result in results) / wall_s,
        "completion_tokens": sum(result["tokens"] for result in results),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
        if latencies
        else None,
        "largest_batch": health["largest_batch"],
        "texts": {result["index"]: result["text"] for result in results},
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(r["wall_s"] for r in rounds)
    ok = sum(r["requests"] - r["errors"] for r in rounds)
    return {
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "requests_per_s": ok / wall,
        "tokens_per_s": sum(r["completion_tokens"] for r in rounds) / wall,
        "p50_s": statistics.median(r["p50_s"] for r in rounds),
        "p99_s": max(r["p99_s"] for r in rounds),
        "largest_batch": max(r["largest_batch"] for r in rounds),
    }


def run_hostile(source: list[str], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One batching server under the hostile mix for args.hostile seconds; the figures afterwards."""
    sys.path.insert(0, str(TESTS))
    from test_serve_hostile import HostileMix, settle

    log_path = folder / "hostile.log"
    process, url = start_server(source, args.batch_size, args.wait_ms, HOSTILE_TIMEOUT_S, log_path, *HOSTILE_LIMITS)
    try:
        mix = HostileMix(
            url, "bench", "instruction", args.hostile, huge_rows=200, over_limit_rows=201,
            client_timeout_s=HOSTILE_TIMEOUT_S + 30,
        )
        mix.run()
        health = settle(url, timeout_s=120)
        after = httpx.post(
            f"{url}/v1/completions", json={"model": "bench", "prompt": "Hi", "max_tokens": 2}, timeout=120
        )
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
    server_log = log_path.read_text(errors="replace")
    return {
        "command": " ".join([".venv/bin/python", "bench/serve_load.py", *sys.argv[1:]]),
        "server_limits": f"--request-timeout {HOSTILE_TIMEOUT_S:g} " + " ".join(HOSTILE_LIMITS),
        "generation": HOSTILE_GENERATION if not args.model else "the run's",
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "figures": mix.figures(),
        "in_flight_after": health["in_flight"],
        "normal_request_after": after.status_code,
        "server_tracebacks": server_log.count("Traceback"),
        "server_exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder to serve (default: smollm2-135m zero-shot via --config)")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batching server")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="--batch-wait-ms of the batching server")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating off/on")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per round before it stops")
    parser.add_argument(
        "--request-timeout", type=float, default=1800.0, help="the servers' --request-timeout"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: print the summary only)")
    parser.add_argument("--hostile", type=float, default=None, help="run the hostile mix for this many seconds")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    source = (
        ["--model", f"bench={args.model}"]
        if args.model
        else ["--config", f"bench={zero_shot_config(folder)}"]
    )
    if args.hostile is not None:
        if not args.model:
            source = ["--config", f"bench={zero_shot_config(folder, HOSTILE_GENERATION)}"]
        report = run_hostile(source, args, folder)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(json.dumps(report, indent=2))
        return
    prompts = alpaca_prompts(args.requests)
    servers = {
        "off": start_server(source, 1, 0.0, args.request_timeout, folder / "off.log"),
        "on": start_server(source, args.batch_size, args.wait_ms, args.request_timeout, folder / "on.log"),
    }
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        for _, url in servers.values():  # warm-up: the first request pays for lazy initialisation
            httpx.post(
                f"{url}/v1/chat/completions",
                timeout=600,
                json={"model": "bench", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            )
        for round_index in range(args.rounds):
            for mode in ("off", "on"):
                result = asyncio.run(
                    run_round(
                        servers[mode][1], "bench", prompts, args.concurrency, args.max_tokens, args.time_limit
                    )
                )
                rounds[mode].append(result)
                print(
                    f"round {round_index + 1} batching {mode}: {result['requests_per_s']:.2f} req/s, "
                    f"{result['tokens_per_s']:.1f} tok/s, p50 {result['p50_s']:.2f} s, "
                    f"p99 {result['p99_s']:.2f} s, errors {result['errors']}, "
                    f"largest batch {result['largest_batch']}",
                    flush=True,
                )
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(120) for process, _ in servers.values()]
    summary = {mode: summarise(results) for mode, results in rounds.items()}
    # Greedy answers with and without batching, over the requests both servers answered.
    both = [
        (rounds["off"][0]["texts"].get(index), text)
        for index, text in rounds["on"][0]["texts"].items()
        if text is not None and rounds["off"][0]["texts"].get(index) is not None
    ]
    same = sum(off_text == on_text for off_text, on_text in both)
    report = {
        "command": " ".join([".venv/bin/python", "bench/serve_load.py", *sys.argv[1:]]),
        "settings": {key: str(value) for key, value in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "summary": summary,
        "speedup_requests_per_s": summary["on"]["requests_per_s"] / summary["off"]["requests_per_s"],
        "speedup_tokens_per_s": summary["on"]["tokens_per_s"] / summary["off"]["tokens_per_s"],
        "identical_answers_on_vs_off": f"{same}/{len(both)}",
        "server_exit_codes": codes,
        "rounds": {
            mode: [{k: v for k, v in r.items() if k != "texts"} for r in results]
            for mode, results in rounds.items()
        },
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(
        json.dumps(
            {
                key: report[key]
                for key in (
                    "summary",
                    "speedup_requests_per_s",
                    "speedup_tokens_per_s",
                    "identical_answers_on_vs_off",
                    "server_exit_codes",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

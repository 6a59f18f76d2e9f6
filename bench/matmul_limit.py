"""The machine's matmul throughput: the ceiling that training and generation speeds are measured against.

Times square-ish fp32 and bf16 matmuls of the shapes a SmolLM2-135M training step runs
((tokens x 576) @ (576 x 1536) and the like) on the threads torch uses, and reports GFLOP/s
(one multiply-add = 2 FLOPs).

    .venv/bin/python bench/matmul_limit.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# (M, K, N): a 1024-token micro-batch through an MLP projection, an attention projection, and a big square.
SHAPES = [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (2048, 2048, 2048)]


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best GFLOP/s over SHAPES for `dtype` (each timed for about `seconds`)."""
    best = 0.0
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        started = time.perf_counter()
        for _ in range(3):  # warm-up; one run is enough where a matmul takes seconds (emulated bf16)
            a @ b
            if time.perf_counter() - started > seconds:
                break
        runs, started = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - started < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9)
    return best


def measure(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    return {"threads": threads, "fp32_gflops": matmul_gflops(torch.float32),
            "bf16_gflops": matmul_gflops(torch.bfloat16)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    print(json.dumps(measure(parser.parse_args().threads)))

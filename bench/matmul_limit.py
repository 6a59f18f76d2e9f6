"""The machine's matmul throughput: the ceiling that training and generation speeds are measured against.

Times square-ish fp32 and bf16 matmuls of the shapes a SmolLM2-135M training step runs
((tokens x 576) @ (576 x 1536) and the like) on the threads torch uses, and reports GFLOP/s
(one multiply-add = 2 FLOPs).

fp32 is timed twice: through `torch.mm` (MKL's sgemm in PyTorch's CPU build) and through oneDNN
with the weight packed once (`tunewright.kernels.prepacked`, what generation uses). On AMD CPUs MKL does
not use AVX-512, and oneDNN's fp32 kernel runs about twice as fast (on an AMD EPYC Zen 5: 381-447
vs 177-188 GFLOP/s, BENCHMARKS.md), so `fp32_gflops`, the machine's fp32 limit, is the faster of the
two; each is also reported (`fp32_mkl_gflops`, `fp32_onednn_gflops`).

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


def onednn_fp32_gflops(seconds: float = 1.0) -> float:
    """Best fp32 GFLOP/s over SHAPES through oneDNN with the weight packed once (0 if unavailable)."""
    if not torch.backends.mkldnn.is_available():
        return 0.0
    best = 0.0
    for m, k, n in SHAPES:
        a, weight = torch.randn(m, k), torch.randn(n, k)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)

        def matmul(a: torch.Tensor = a, packed: torch.Tensor = packed) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")

        matmul()
        runs, started = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - started < seconds:
            matmul()
            runs += 1
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - started) / 1e9)
    return best


def measure(threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    mkl, onednn = matmul_gflops(torch.float32), onednn_fp32_gflops()
    return {"threads": threads, "fp32_gflops": max(mkl, onednn), "fp32_mkl_gflops": mkl,
            "fp32_onednn_gflops": onednn, "bf16_gflops": matmul_gflops(torch.bfloat16)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    print(json.dumps(measure(parser.parse_args().threads)))

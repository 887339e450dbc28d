"""The ratios issue 2 asks for, measured side by side in one process on the CPU:

    python -m llmfast.benchmarks.softmax_ratios

fp32 softmax / log_softmax 4096x4096 (torch eager vs the llmfast cpu backend), and the
fused scale+mask+softmax vs the unfused eager sequence. Runs are interleaved and the
best of three medians is kept, so background load biases both sides alike.
"""
import statistics
import time

import torch

import llmfast
from llmfast.nn import functional as LF


def _median_ms(fn, reps=30):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    torch.manual_seed(0)
    x = torch.randn(4096, 4096)
    x3 = torch.randn(16, 1024, 1024)
    keep = torch.rand(1024, 1024) > 0.2
    cases = [
        ("softmax 4096x4096", lambda: torch.softmax(x, -1), lambda: LF.softmax(x, -1)),
        ("log_softmax 4096x4096", lambda: torch.log_softmax(x, -1), lambda: LF.log_softmax(x, -1)),
        ("scale+mask+softmax 16x1024x1024 vs eager sequence",
         lambda: torch.softmax((x3 * 0.125).masked_fill(~keep, float("-inf")), -1),
         lambda: LF.softmax(x3, -1, scale=0.125, mask=keep)),
    ]
    with llmfast.backend("cpu"):
        for name, ref, ours in cases:
            a, b = [], []
            for _ in range(3):
                a.append(_median_ms(ref))
                b.append(_median_ms(ours))
            print(f"{name}: torch {min(a):.2f} ms, llmfast cpu {min(b):.2f} ms, speedup {min(a) / min(b):.2f}x")


if __name__ == "__main__":
    main()

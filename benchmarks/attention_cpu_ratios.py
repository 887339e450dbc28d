"""CPU attention ratios measured in one run: llmfast's cpu backend vs torch SDPA and vs
eager ``softmax(q@kᵀ·scale)@v``, forward and forward+backward, with peak memory.

    python -m llmfast.benchmarks.attention_cpu_ratios [--B 1 --H 8 --L 2048 --D 64 --rounds 7]
        [--threads N] [--clock wall|cpu]

Providers run interleaved (A, B, C, A, B, C, ...) and the minimum and median time of
each is reported: on a shared machine the minimum is the best estimate of the
uncontended time, and interleaving exposes every provider to the same load.
``--clock cpu --threads 1`` times process CPU time on one thread, which other
processes on an oversubscribed machine do not inflate. Peak memory is
:func:`llmfast.bench.peak_memory_mb` (extra resident memory above the inputs).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as tF

import llmfast
from llmfast.bench import peak_memory_mb
from llmfast.nn import functional as LF


def _eager(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def _llmfast(q, k, v, causal):
    with llmfast.backend("cpu"):
        return LF.scaled_dot_product_attention(q, k, v, is_causal=causal)


PROVIDERS = {
    "llmfast:cpu": _llmfast,
    "torch_sdpa": lambda q, k, v, causal: tF.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "torch_eager_math": _eager,
}


def _callable(fn, q, k, v, dout, causal, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(q, k, v, causal)
        return fwd

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, causal).backward(dout)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter; cpu: time.process_time (use with --threads 1)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(a.B, a.H, a.L, a.D, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    print(f"fp32 B={a.B} H={a.H} L=S={a.L} D={a.D}, {torch.get_num_threads()} threads, {a.clock} clock, "
          f"{a.rounds} interleaved rounds")
    print(f"{'case':<18}{'provider':<18}{'min ms':>9}{'median ms':>11}{'peak MB':>9}"
          f"{'cpu vs this (min)':>19}{'(median)':>10}")
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            fns = {name: _callable(fn, q, k, v, dout, causal, mode) for name, fn in PROVIDERS.items()}
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(a.rounds):
                for name, fn in fns.items():
                    t0 = clock()
                    fn()
                    times[name].append((clock() - t0) * 1e3)
            peaks = {name: peak_memory_mb(fn, "cpu") for name, fn in fns.items()}
            ours_min, ours_med = min(times["llmfast:cpu"]), statistics.median(times["llmfast:cpu"])
            case = f"{mode}{' causal' if causal else ''}"
            for name in fns:
                tmin, tmed = min(times[name]), statistics.median(times[name])
                print(f"{case:<18}{name:<18}{tmin:9.1f}{tmed:11.1f}{peaks[name]:9.1f}"
                      f"{tmin / ours_min:18.2f}x{tmed / ours_med:9.2f}x", flush=True)


if __name__ == "__main__":
    main()

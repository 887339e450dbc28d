"""The CPU ratios issue 3 asks for (fp32, 8192 x 4096): llmfast:cpu vs torch for
LayerNorm and RMSNorm, forward and forward+backward, and the fused residual path vs
eager ``x + r`` then the norm. Uses the cases of bench_layer_norm / bench_rms_norm.

    python -m llmfast.benchmarks.norm_ratios [--rounds 9] [--threads N]

Providers run interleaved, round by round, so a load change on a shared machine hits
both; reports medians of wall time and of process CPU time (user + sys: it includes the
kernel's page faults and zeroing for the fresh 128 MB outputs, which dominate here).
"""
import argparse
import statistics
import time

import torch

from llmfast.bench import bench_modules

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--op", action="append")
    ap.add_argument("--kind", action="append")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}")
    mods = bench_modules(args.op or ["layer_norm", "rms_norm"])
    for op, mod in mods.items():
        for kind, mode in (("norm", "fwd"), ("norm", "fwd+bwd"), ("residual", "fwd"), ("residual", "fwd+bwd")):
            if args.kind and f"{kind} {mode}" not in args.kind:
                continue
            case = dict(name="", kind=kind, mode=mode, shape=(8192, 4096), dtype=torch.float32)
            fns = {p: mod.setup(p, case, "cpu") for p in ("torch", "llmfast:cpu")}
            for f in fns.values():
                f()
            wall = {p: [] for p in fns}
            cpu = {p: [] for p in fns}
            for _ in range(args.rounds):
                for p, f in fns.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    f()
                    wall[p].append(time.perf_counter() - t0)
                    cpu[p].append(time.process_time() - c0)
            w = {p: statistics.median(v) * 1e3 for p, v in wall.items()}
            c = {p: statistics.median(v) * 1e3 for p, v in cpu.items()}
            print(f"{op:<11}{kind:<9}{mode:<8} wall: torch {w['torch']:7.1f} llmfast:cpu {w['llmfast:cpu']:7.1f} ms "
                  f"= {w['torch'] / w['llmfast:cpu']:.2f}x | cpu time: torch {c['torch']:7.1f} llmfast:cpu "
                  f"{c['llmfast:cpu']:7.1f} ms = {c['torch'] / c['llmfast:cpu']:.2f}x", flush=True)
            del fns


if __name__ == "__main__":
    main()

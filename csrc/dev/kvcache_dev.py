"""Scratch timer for CPU decode-attention variants (llm.c style; not part of the package).

Builds one variant of ``csrc/cpu/kvcache.cpp`` (a copy edited by hand, or the file itself)
as its own library, outside llmfast (the schema is defined here, so llmfast._C is never
loaded), checks it against float64 SDPA and times it next to a ``copy_`` of the same bytes.

    python csrc/dev/kvcache_dev.py [variant.cpp] [name]      # T=2 for two threads (wall time)

One thread by default, timed in *thread CPU time*: on a shared machine wall time mostly
measures the other processes. The fraction is copy time / kernel time, the bench's
definition (a copy of the K bytes moves as much traffic as the K/V bytes the kernel reads).

Variants timed this way (B=1 S=32768 and B=8 S=4096, Hq=32 Hkv=8 D=128, median ms fp32 / bf16,
one thread, a machine loaded by other builds, so +-10%):
  v0 main 25b3117: one dot per (query row, key) with its own horizontal sum, one axpy per
     (row, key) loading and storing the accumulator, scalar exp, bf16 rows converted by
     at::vec::convert (scalar for bf16)                              53 / 51 ms (0.28 / 0.17)
  v1 MB-row register blocking of the dots, MB-key blocking of p.V, vectorised exp
                                                                     33 / 29 ms (0.43 / 0.28)
  v2 = v1 + fp16/bf16 widened in registers (load_to_float), keys of the scores in memory
     order, p broadcasts hoisted: promoted                           32 / 26 ms (0.41 / 0.26)
  v3 = v2 + two accumulator chains per row in the dots              34 / 23 ms: within noise
  v2 without the p.V pass (K side alone)                             22 / 14 ms
What is left is compute in the K side (a horizontal reduction per row and key); a 4x4
transposed reduction of the dots is the next thing to try.
"""
import os
import sys
import time

import torch
import torch.nn.functional as tF
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = ("(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor seqlens, Tensor? kv_start, "
          "Tensor? alibi, float scale, bool causal, int window_left, int window_right, float softcap, "
          "int num_splits) -> (Tensor, Tensor)")
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
         "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]   # setup.py's avx512 flags


def median(fn, n, clock):
    ts = []
    for _ in range(n):
        t = clock()
        fn()
        ts.append(clock() - t)
    return sorted(ts)[n // 2]


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "csrc/cpu/kvcache.cpp")
    name = sys.argv[2] if len(sys.argv) > 2 else "kvcache_dev"
    threads = int(os.environ.get("T", "1"))
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    torch.library.define("llmfast::kvcache_fwd", SCHEMA)
    build = f"/tmp/{name}_build"
    os.makedirs(build, exist_ok=True)
    load(name=name, sources=[src], extra_cflags=FLAGS, extra_include_paths=[os.path.join(ROOT, "csrc")],
         is_python_module=False, build_directory=build)
    op = torch.ops.llmfast.kvcache_fwd
    for B, S in [(1, 32768), (8, 4096)]:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, 1, 32, 128, generator=g).to(dt)
            k, v = (torch.randn(B, S, 8, 128, generator=g).to(dt) for _ in range(2))
            table = torch.arange(B, dtype=torch.int32)[:, None]
            seqlens = torch.full((B,), S, dtype=torch.int32)
            src_k, dst = k.reshape(-1), torch.empty(k.numel(), dtype=dt)

            def kernel():
                return op(q, k, v, table, seqlens, None, None, 128 ** -0.5, False, -1, -1, 0.0, 0)

            def copy():
                dst.copy_(src_k)
            kernel(), copy()
            tk, tc = [], []
            for _ in range(5):  # interleaved rounds
                tk.append(median(kernel, 3, clock))
                tc.append(median(copy, 3, clock))
            tk, tc = sorted(tk)[2], sorted(tc)[2]
            ref = tF.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v)),
                                                  enable_gqa=True, scale=128 ** -0.5).transpose(1, 2)
            err = (kernel()[0].double() - ref).abs().max().item()
            read = 2 * k.numel() * k.element_size()
            print(f"{name} B{B} S{S} {str(dt)[6:]}: {tk * 1e3:.2f} ms, {read / tk / 1e9:.1f} GB/s of K/V; copy "
                  f"{read / tc / 1e9:.1f} GB/s; fraction {tc / tk:.2f}; max err {err:.2e}", flush=True)


if __name__ == "__main__":
    main()

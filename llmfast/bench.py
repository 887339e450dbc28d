"""The benchmark harness behind ``llmfast bench`` and ``pytest benchmarks/``.

Each ``benchmarks/bench_<op>.py`` (shipped as ``llmfast.benchmarks.bench_<op>``)
defines:

* ``OP``: the op name (as in :data:`llmfast.backends.OPS`),
* ``cases(quick: bool, device: str, dtypes: list) -> list[dict]``: each case is a
  dict with ``name`` (shape text), ``dtype`` and whatever ``setup`` needs,
* ``providers(case, device) -> list[str]``: extra baselines beyond ``torch``, e.g.
  ``["torch_compile"]`` or ``["torch_unfused"]``,
* ``setup(provider, case, device) -> callable``: a zero-argument callable that
  runs the timed work and returns the tensor to check; provider is ``"torch"``,
  a name from ``providers``, or ``"llmfast:<backend>"``,
* ``reference(case, device) -> Tensor``: the float64 result of the same work,
* ``work(case) -> (unit, amount)``: ``("GB/s", bytes)`` or ``("TFLOP/s", flops)``.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed); on
CPU the median of repeated wall-clock runs after a warm-up. Speedups are ratios of
medians taken in the same run.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import math
import pkgutil
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from llmfast import backends


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    provider: str
    ms: float
    throughput: float
    unit: str
    speedup: float
    max_err: float
    peak_mb: float | None = None
    error: str | None = None

    def as_dict(self):
        return asdict(self)


def bench_modules(only=None):
    """The benchmark modules, by op name."""
    import llmfast.benchmarks as pkg

    mods = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("bench_"):
            mod = importlib.import_module(f"llmfast.benchmarks.{info.name}")
            if only is None or mod.OP in only:
                mods[mod.OP] = mod
    return mods


def llmfast_providers(op: str, device: str, dtype) -> list:
    out = []
    for name, why in backends.available(op, device).items():
        if why is not None or name == "torch":
            continue
        if name == "triton" and torch.device(device).type == "cpu":
            continue  # the interpreter is a test tool, not a contender
        if dtype in backends.OPS[op].dtypes_for(name):
            out.append(f"llmfast:{name}")
    return out


def time_ms(fn, device: str, min_time: float = 0.25, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn()``."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (and first-call compilation)
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


_MALLOC_SET = False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_memory_mb(fn, device: str) -> float | None:
    """Extra memory ``fn()`` peaks at, above what was allocated before it ran.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (Linux
    ``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc told to serve
    large blocks by mmap so that freed tensors leave the resident set at once.
    """
    global _MALLOC_SET
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        if not _MALLOC_SET:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic growth)
            libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
            _MALLOC_SET = True
        fn()  # settle caches (e.g. torch.compile) before measuring
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - base) / 1024
    except OSError:
        return None


def max_error(out, ref) -> float:
    if out is None or ref is None:
        return float("nan")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return float("inf")
    return (out - ref)[finite].abs().max().item() if finite.any() else 0.0


def run_case(mod, case, device, memory=False):
    """Time every provider on one case; returns Rows (the first is torch)."""
    unit, amount = mod.work(case)
    provs = ["torch"] + list(mod.providers(case, device)) + llmfast_providers(mod.OP, device, case["dtype"])
    ref = mod.reference(case, device)
    rows, base_ms = [], None
    for prov in provs:
        try:
            fn = mod.setup(prov, case, device)
            err = max_error(fn(), ref)
            ms = time_ms(fn, device)
            peak = peak_memory_mb(fn, device) if memory else None
            del fn
        except Exception as e:  # a provider that can't run this case is reported, not fatal
            rows.append(Row(mod.OP, case["name"], str(case["dtype"]).replace("torch.", ""), prov, math.nan,
                            math.nan, unit, math.nan, math.nan, None, f"{type(e).__name__}: {e}"[:200]))
            continue
        if prov == "torch":
            base_ms = ms
        scale = 1e-9 if unit == "GB/s" else 1e-12
        rows.append(Row(mod.OP, case["name"], str(case["dtype"]).replace("torch.", ""), prov, ms,
                        amount * scale / (ms * 1e-3), unit, (base_ms / ms) if base_ms else math.nan, err, peak))
    return rows

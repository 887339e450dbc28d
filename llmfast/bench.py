"""The benchmark harness behind ``llmfast bench``, ``llmfast check`` and ``pytest benchmarks/``.

Each ``benchmarks/bench_<op>.py`` (shipped as ``llmfast.benchmarks.bench_<op>``) is
that op's cases file, for timing and for checking. It defines:

* ``OP``: the op name (as in :data:`llmfast.backends.OPS`),
* ``cases(quick: bool, device: str, dtypes: list) -> list[dict]``: each case is a
  dict with ``name`` (shape text), ``dtype`` and whatever ``setup`` needs,
* ``providers(case, device) -> list[str]``: baselines beyond ``torch``, e.g.
  ``["torch_compile"]``, or ``"eager"`` where ``torch`` is one fused torch op and
  the sequence of torch ops that users write is another baseline,
* ``setup(provider, case, device) -> callable``: a zero-argument callable that
  runs the timed work and returns the tensor to check; provider is ``"torch"``,
  a name from ``providers``, or ``"llmfast:<backend>"``,
* ``reference(case, device) -> Tensor``: the float64 result of the same work,
* ``work(case) -> (unit, amount)``: ``("GB/s", bytes)``, ``("TFLOP/s", flops)`` or a
  plain rate such as ``("tokens/s", tokens)``,
* ``checks() -> list of (name, make_inputs(device, dtype), fn)``: small correctness
  cases for ``llmfast check`` (``name``'s first word is the op, so one file may hold
  several ops' checks, as bench_softmax does for softmax and log_softmax),
* optionally ``MEMORY = True``: measure every provider's peak memory by default,
* optionally ``PROVIDER_OP``: the op whose backends give the ``llmfast:<backend>``
  providers, for a case that is not one op (a whole model's training step).

Timing (:func:`time_interleaved`, the one timing path): the providers of a case run in
rounds, each once per round in turn, and medians are reported, so that a load change
on a shared machine hits all of them alike. On CUDA one sample is
``triton.testing.do_bench``'s median (CUDA events, warm-up, L2 flushed); on CPU one
wall-clock call, with its process CPU time beside it.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import math
import pkgutil
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from llmfast import backends


@dataclass
class Row:
    """One provider on one case. Times are medians (and the minimum) over rounds, in ms."""

    op: str
    case: str
    dtype: str
    provider: str
    unit: str
    ms: float = math.nan
    min_ms: float = math.nan
    cpu_ms: float | None = None      # process CPU time (all threads); None on CUDA
    samples: int = 0                 # rounds timed
    throughput: float = math.nan
    speedup: float = math.nan        # the ``vs`` provider's median time / this one's
    vs: str | None = None
    max_err: float = math.nan
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


def case_providers(mod, case, device) -> list:
    """Every provider of a case: torch, the module's other baselines, the llmfast backends that can run it."""
    op = getattr(mod, "PROVIDER_OP", mod.OP)
    return ["torch", *mod.providers(case, device), *llmfast_providers(op, device, case["dtype"])]


def baseline(vs: str, providers) -> str | None:
    """The provider that ``--vs vs`` divides by among ``providers``, None if absent.

    ``eager`` is torch where a case has no separate eager provider: there torch's own
    op already is what eager code runs (``torch.softmax``, or the eager ``x + r`` then
    norm of a residual case).
    """
    if vs in providers:
        return vs
    return "torch" if vs == "eager" and "torch" in providers else None


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:200]


@dataclass
class Timing:
    """One provider's samples, one per round, in ms: wall clock (or CUDA events) and process CPU time."""

    ms: list = field(default_factory=list)
    cpu_ms: list = field(default_factory=list)   # empty when timed with CUDA events
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.ms) if self.ms else math.nan


def time_interleaved(fns: dict, *, rounds: int | None = None, cuda: bool = False, min_time: float = 0.25,
                     max_rounds: int = 200) -> dict:
    """Time the zero-argument callables ``fns`` (name -> fn) in rounds: A, B, C, A, B, C, ...

    Timing one provider after another lets a load change between them (another job on a
    shared machine) pass for a speed difference; interleaved, every provider sees the
    same load and the ratio of medians stays fair.

    ``rounds``: how many; by default one on CUDA (each sample is already a median of
    many runs) and, on CPU, until the samples add up to ``min_time`` seconds per
    provider (at least 5 rounds, at most ``max_rounds``). ``cuda``: a sample is
    ``triton.testing.do_bench``'s median (events, warm-up, L2 flushed); otherwise
    each provider runs once untimed, then one call per sample is timed by the wall
    clock (a callable that launches GPU work synchronises itself) and by process CPU
    time. A provider that raises leaves the rotation with its error recorded.
    Returns name -> :class:`Timing`.
    """
    out = {name: Timing() for name in fns}
    live = dict(fns)

    def call(name, timed=True):
        fn, t = live[name], out[name]
        try:
            if not timed:
                fn()
            elif cuda:
                import triton.testing

                t.ms.append(float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")))
            else:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                t.ms.append((t1 - t0) * 1e3)
                t.cpu_ms.append((c1 - c0) * 1e3)
        except Exception as e:  # one provider failing (out of memory, say) leaves the others' timing intact
            t.error = _describe(e)
            del live[name]

    def enough(n):
        if rounds is not None:
            return n >= rounds
        if cuda:
            return n >= 1
        # a budget for all providers together, so that one slow provider (a compiled eager
        # expression) does not hold the fast ones to max_rounds
        spent = sum(sum(out[p].ms) for p in live)
        return n >= max_rounds or (n >= 5 and spent >= min_time * 1e3 * len(live))

    if not cuda:  # do_bench warms up by itself
        for name in list(live):
            call(name, timed=False)   # first-call work: compilation, allocator growth
    n = 0
    while live and not enough(n):
        for name in list(live):
            call(name)
        n += 1
    return out


# ----------------------------------------------------------------------------------
# Peak memory


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS:``, ``VmHWM:``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (Linux ``VmHWM``), or None without /proc."""
    try:
        return _status_kb("VmHWM:") / 1024
    except OSError:
        return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_for_measuring(libc) -> None:
    # Fixed 64 KiB thresholds: every large block is its own mmap and a freed one leaves the
    # resident set at once, so the high-water mark counts what fn holds, not what glibc kept.
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)


def _malloc_for_timing(libc) -> None:
    # glibc's steady state, which timing must see: by default it raises the mmap threshold to
    # the largest block freed so far (at most 32 MiB on 64-bit) and keeps the heap, so a loop
    # reuses warm memory. Under the measuring setting every activation is a fresh mmap and
    # munmap, and page faults took a third of a training step's time here.
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def peak_memory_mb(fn, device: str) -> float | None:
    """Extra memory ``fn()`` peaks at, above what was allocated before it ran.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (Linux
    ``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc told to serve large
    blocks by mmap and to hand free heap pages back first, so that freed tensors leave
    the resident set at once; glibc's usual setting is restored afterwards, so timings
    taken later are not charged for the measurement's page faults.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = _libc()
    if libc is None:
        return None
    _malloc_for_measuring(libc)
    try:
        fn()  # settle caches (e.g. torch.compile) before measuring
        gc.collect()
        # Free pages that an earlier heap kept would be reused by fn without raising the mark.
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS:")
        fn()
        return max(0, _status_kb("VmHWM:") - base) / 1024
    except OSError:
        return None
    finally:
        _malloc_for_timing(libc)


# ----------------------------------------------------------------------------------
# One case


def max_error(out, ref) -> float:
    if out is None or ref is None:
        return float("nan")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return float("inf")
    return (out - ref)[finite].abs().max().item() if finite.any() else 0.0


def run_case(mod, case, device, *, memory=False, rounds=None, vs="torch", only=None) -> list:
    """Check and time every provider of one case; returns Rows in provider order, torch first.

    ``vs``: the provider the speedup column divides by (:func:`baseline`). ``only``:
    the providers to run besides torch (the reference row) and the ``vs`` baseline
    (default: all). ``rounds``: see :func:`time_interleaved`. ``memory``: also measure
    each provider's peak memory.
    """
    unit, amount = mod.work(case)
    provs = case_providers(mod, case, device)
    base = baseline(vs, provs)
    if only:
        provs = [p for p in provs if p in only or p in ("torch", base)]
    rows = {p: Row(mod.OP, case["name"], str(case["dtype"]).replace("torch.", ""), p, unit, vs=base) for p in provs}
    ref = mod.reference(case, device)
    fns = {}
    for prov in provs:
        try:
            fns[prov] = mod.setup(prov, case, device)
            rows[prov].max_err = max_error(fns[prov](), ref)
        except Exception as e:  # a provider that can't run this case is reported, not fatal
            fns.pop(prov, None)
            rows[prov].error = _describe(e)
    del ref
    timings = time_interleaved(fns, rounds=rounds, cuda=torch.device(device).type == "cuda")
    base_ms = timings[base].median if base in timings else math.nan
    scale = {"GB/s": 1e-9, "TFLOP/s": 1e-12}.get(unit, 1.0)
    for prov, t in timings.items():
        r = rows[prov]
        r.error = t.error
        if t.error:
            continue
        r.ms, r.min_ms, r.samples = t.median, min(t.ms), len(t.ms)
        r.cpu_ms = statistics.median(t.cpu_ms) if t.cpu_ms else None
        r.throughput = amount * scale / (r.ms * 1e-3)
        r.speedup = base_ms / r.ms
        if memory:
            try:
                r.peak_mb = peak_memory_mb(fns[prov], device)
            except Exception as e:
                r.error = _describe(e)
    return list(rows.values())

"""Hypothesis strategies and the test factory shared by the property tests (tests/fuzz/test_fuzz_*.py).

A case is a plain dict of shapes, flags and seeds (hypothesis prints it when a property
fails, and it shrinks well); :func:`tensor` turns a seed and a list of special values
into a tensor, so a case never draws elements one by one. Each property checks one
public function on one backend against a float64 run of the ``torch`` reference with
FlashAttention's rule (:func:`llmfast.testing.check`: forward and every gradient), and,
where torch has the same function, that the reference means what torch means.

Two profiles (``hypothesis.settings`` profiles, chosen by the test, not globally):

* ``llmfast-ci``: derandomized (fixed seed), no deadline, a few examples per function
  and backend: part of ``pytest -m "not slow"``.
* ``llmfast-fuzz``: random, ``LONG_EXAMPLES[backend]`` examples per function (10,000 on
  the cpu backend); the tests are marked ``fuzz`` and ``slow``: ``pytest -m fuzz``.
  ``LLMFAST_FUZZ_EXAMPLES`` scales it (a number, or ``backend=n,...``);
  ``LLMFAST_FUZZ_LOG=path`` appends ``function backend examples seconds failing`` per test;
  ``LLMFAST_FUZZ_COLLECT=1`` keeps going after a failing example and reports every kind
  of failure with its count and first case at the end (the test still fails).

Sizes are capped per backend (``BUDGET``: elements per tensor): the Triton interpreter
and the CUDA warp emulator run the same kernels orders of magnitude slower than the
C++ ones.
"""
from __future__ import annotations

import math
import os
import re
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption

from llmfast.backends import backend as use_backend
from llmfast.testing import check as _check
from tests.conftest import DEVICE, backends_for

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]
settings.register_profile("llmfast-ci", derandomize=True, deadline=None, database=None, max_examples=6,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("llmfast-fuzz", derandomize=False, deadline=None, database=None, max_examples=10_000,
                          suppress_health_check=_QUIET, print_blob=True)

# examples per function in the long profile, by backend
LONG_EXAMPLES = {"cpu": 10_000, "triton": 100, "cuda": 40}
# elements per tensor, by backend (CI runs the same caps)
BUDGET = {"cpu": 6_000, "triton": 1_500, "cuda": 300}
# the CI profile: examples per function and backend
CI_EXAMPLES = {"cpu": 6, "triton": 2, "cuda": 2}


def _long_examples(backend: str) -> int:
    spec = os.environ.get("LLMFAST_FUZZ_EXAMPLES", "")
    if spec.isdigit():
        return int(spec)
    for item in filter(None, spec.split(",")):
        name, _, n = item.partition("=")
        if name.strip() == backend:
            return int(n)
    return LONG_EXAMPLES[backend]


def fuzz_tests(name: str, op: str, cases, prop):
    """``(test_ci, test_fuzz)`` for one public function: ``prop(backend, case)`` over
    ``cases(budget, nonfinite)`` on each llmfast backend of ``op`` (emulated cuda included).

    The CI profile plants only finite specials (±1e4, denormals); the long one ±inf and
    NaN too, whose semantics the kernels do not all match torch's yet (its log says where).
    """
    def make(long: bool):
        def test(backend, one_thread):
            seen = [0]
            n = _long_examples(backend) if long else CI_EXAMPLES[backend]
            profile = settings(settings.get_profile("llmfast-fuzz" if long else "llmfast-ci"), max_examples=n)

            failures = {}   # collect mode: signature -> [count, first case, message]
            collect = long and bool(os.environ.get("LLMFAST_FUZZ_COLLECT"))

            @profile
            @given(case=cases(BUDGET[backend], long))
            def run(case):
                seen[0] += 1
                if not collect:
                    prop(backend, case)
                    return
                try:
                    prop(backend, case)
                except UnsatisfiedAssumption:
                    raise                # a filtered example (assume), not a failure
                except Exception as e:   # noqa: BLE001 - counted by kind, the run goes on
                    f = failures.setdefault(_signature(e), [0, case, f"{type(e).__name__}: {e}"[:400]])
                    f[0] += 1

            start = time.perf_counter()
            try:
                run()
            finally:
                log = os.environ.get("LLMFAST_FUZZ_LOG")
                if log and long:
                    with open(log, "a") as f:
                        f.write(f"{name} {backend} examples={seen[0]} seconds={time.perf_counter() - start:.0f} "
                                f"failing={sum(c for c, _, _ in failures.values())}\n")
                        for count, case, msg in failures.values():
                            f.write(f"    {count}x {msg!r}\n        first: {case!r}\n")
            assert seen[0] > 0
            assert not failures, "\n".join(f"{c}x {m}\n  first: {case!r}" for c, case, m in failures.values())
        test.__name__ = f"test_fuzz_{name}" + ("_long" if long else "")
        test = pytest.mark.parametrize("backend", backends_for(op, emu=True))(test)
        return pytest.mark.slow(pytest.mark.fuzz(test)) if long else test
    return make(False), make(True)


def _signature(e: Exception) -> str:
    """What kind of failure: the exception type and its message without the numbers, and for
    a tolerance failure only the outputs that broke their bound."""
    msg = str(e).split("\n")[0]
    broken = re.findall(r"(\w+): ([^ ,]+) \(bound ([^)]+)\)", msg)
    if broken:
        msg = " ".join(n for n, err, bound in broken if not float(err) <= float(bound))
    return f"{type(e).__name__}: " + re.sub(r"[-+]?\d[\d.e+-]*", "#", msg)[:160]


# ----------------------------------------------------------------------------------
# Building blocks

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# awkward sizes: empty, one, primes, powers of two and one past, longer than one block
SMALL = [0, 1, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31]
LARGE = [64, 67, 127, 128, 131, 257, 521, 1031, 4099]
SPECIAL = ["inf", "-inf", "nan", "1e4", "-1e4", "denormal"]
FINITE = ["1e4", "-1e4", "denormal"]
# What the CI profile plants in attention's q, k, v: ±1e4 make the softmax ill-conditioned (a
# score of 2e4 rounds by 2e-3 in fp32), and torch's own error, one rounding fewer than a fused
# kernel's, can then be 0 where the kernel's is 6e-4 (the long profile plants them and reports)
TINY = ["denormal"]


def sizes(min_size: int = 0, large: bool = True):
    """One dim's size: mostly small, sometimes past a block (the budget clips it)."""
    small = st.sampled_from([s for s in SMALL if s >= min_size])
    return st.one_of(small, small, st.sampled_from(LARGE)) if large else small


def clip(shape, budget: int, keep=()):
    """Shrink the largest dims (not those in ``keep``) until the product fits ``budget``."""
    shape = list(shape)
    while math.prod(shape) > budget:
        free = [i for i in range(len(shape)) if i not in keep and shape[i] > 1] or \
               [i for i in range(len(shape)) if shape[i] > 1]
        i = max(free, key=lambda j: shape[j])
        shape[i] = max(1, shape[i] // 2 - (shape[i] // 2) % 2 + 1)   # stay odd: still awkward
    return tuple(shape)


def specials(max_n: int = 3, p_none: bool = True, values=SPECIAL, nonfinite: bool = True):
    """Where (a fraction of the tensor) and which special value to plant (``nonfinite=False``:
    only the finite ones, ±1e4 and denormals)."""
    one = st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(values if nonfinite else FINITE))
    lists = st.lists(one, max_size=max_n)
    return st.one_of(st.just([]), st.just([]), lists) if p_none else lists


def _special(v: str, dtype: torch.dtype) -> float:
    if v == "denormal":
        return torch.finfo(dtype).tiny / 8   # subnormal in fp32/fp16/bf16 alike
    return float(v)


def tensor(shape, dtype, seed: int, plant=(), scale: float = 1.0) -> torch.Tensor:
    """randn(shape) * scale from ``seed`` in ``dtype``, with the ``plant`` values written in."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype)
    flat = x.view(-1)
    for where, v in plant:
        if flat.numel():
            flat[int(where * flat.numel())] = _special(v, dtype)
    return x.to(DEVICE)


def layouts(expand: bool = False):
    kinds = ["contiguous", "contiguous", "transposed", "strided"] + (["expanded"] if expand else [])
    return st.sampled_from(kinds)


def lay(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout, differentiably (so it happens inside the
    function under test: ``compare`` clones its inputs, and a clone is dense).

    transposed: dims 0 and -1 swapped in memory; strided: every other element of a
    buffer twice as large in each dim (no dim has unit stride); expanded: a size-1 dim
    broadcast with stride 0 is left to the caller (see ``bcast``)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "strided" and t.dim() >= 1:
        big = t.new_zeros(tuple(2 * n for n in t.shape))
        view = big[(slice(None, None, 2),) * t.dim()]
        view.copy_(t)
        return view
    return t


def bcast(shape, flags):
    """``shape`` with the dims where ``flags`` is True set to 1 (broadcast back later)."""
    return tuple(1 if f else n for n, f in zip(shape, flags))


def seeds():
    return st.integers(0, 2**31 - 1)


ULPS = 4.0


def check(fn, inputs, backend: str, **kw):
    """:func:`llmfast.testing.check` with a few roundings of slack at the result's largest
    magnitude (``ulps=ULPS``): on the small tensors drawn here one element carries the
    maximum error, and torch's error there can be near zero by luck (a 64-element
    log_softmax gradient of magnitude 26: torch 3 ulps, a kernel that rounds once more 6);
    planted ±1e4 make that element large."""
    return _check(fn, inputs, backend, ulps=ULPS, **kw)


def on(backend: str, fn, *args, **kw):
    with use_backend(backend):
        return fn(*args, **kw)


def same_as_torch(ours, theirs, inputs, *, rtol: float = 1e-7, atol: float = 1e-9):
    """The float64 ``torch`` reference of llmfast (``ours``) gives what torch gives
    (``theirs``), NaN and inf included: the semantics the kernels are held to."""
    args = [t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        a = on("torch", ours, *args)
        b = theirs(*args)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, check_dtype=False)

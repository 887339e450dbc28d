"""Correctness harness shared by the tests and ``llmfast check``.

:func:`compare` runs a function on one backend and checks its output and every
input gradient against a float64 run of the ``torch`` reference, with
FlashAttention's rule: ``max|out - ref| <= 2 * max|torch_same_dtype - ref| + atol``.
The kernel must be about as accurate as PyTorch in the same dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from llmfast.backends import backend

# Added to the 2x-PyTorch bound: covers the last-bit differences of fp32 math, and
# fp16/bf16 rounding of the stored result.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Result:
    backend: str
    errors: dict = field(default_factory=dict)   # name -> (err, bound)
    ok: bool = True

    def worst(self) -> float:
        return max((e for e, _ in self.errors.values()), default=0.0)

    def __str__(self):
        parts = [f"{k}: {e:.3g} (bound {b:.3g})" for k, (e, b) in self.errors.items()]
        return f"[{self.backend}] " + ", ".join(parts)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    nan_x, nan_r = torch.isnan(x), torch.isnan(ref)
    if not torch.equal(nan_x, nan_r):
        return float("inf")
    both_inf = torch.isinf(x) & torch.isinf(ref) & (x == ref)
    diff = (x - ref).abs().masked_fill(nan_x | both_inf, 0.0)
    return diff.max().item() if diff.numel() else 0.0


def _run(fn, inputs, grad_flags, dtype_to, cotangents, device_override=None):
    args = []
    for t, g in zip(inputs, grad_flags):
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if dtype_to is not None and t.is_floating_point():
                t = t.to(dtype_to)
            t = t.clone() if not g else t.clone().requires_grad_(True)
        args.append(t)
    outs = _as_tuple(fn(*args))
    diff_inputs = [a for a, g in zip(args, grad_flags) if g]
    grads = ()
    if diff_inputs and cotangents is not None:
        pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
        if pairs:
            grads = torch.autograd.grad([o for o, _ in pairs], diff_inputs,
                                        [c.to(o.dtype) for o, c in pairs], allow_unused=True)
            grads = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(diff_inputs, grads))
    return tuple(o.detach() for o in outs), grads


def _max_abs(ref: torch.Tensor) -> float:
    finite = ref.double().abs().masked_fill(~torch.isfinite(ref), 0.0)
    return finite.max().item() if finite.numel() else 0.0


def compare(fn: Callable, inputs: Sequence, backend_name: str, *, grad: Sequence[bool] | bool = True,
            atol: float | None = None, ulps: float = 0.0, seed: int = 0) -> Result:
    """Check ``fn(*inputs)`` (outputs and input gradients) on ``backend_name``.

    ``inputs``: tensors (and other args passed through). ``grad``: which floating
    inputs get gradients (True = every floating tensor). Output cotangents are
    random, and zero where the reference output is not finite. ``ulps``: adds
    ``ulps * eps(dtype) * max|ref|`` to each bound, the rounding of the result at its
    largest magnitude: for inputs spanning many binades (the property tests plant
    ±1e4), where torch's own error on a few elements can be zero by luck.
    """
    flags = []
    for i, t in enumerate(inputs):
        want = grad if isinstance(grad, bool) else grad[i]
        flags.append(bool(want) and isinstance(t, torch.Tensor) and t.is_floating_point())
    dtype = next((t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.float32)
    tol = ATOL[dtype] if atol is None else atol
    with backend("torch"):
        ref_out, _ = _run(fn, inputs, [False] * len(inputs), torch.float64, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cot = tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device).masked_fill(~torch.isfinite(o), 0)
                if o.is_floating_point() else None for o in ref_out)
    with backend("torch"):
        ref_out, ref_grads = _run(fn, inputs, flags, torch.float64, cot)
        base_out, base_grads = _run(fn, inputs, flags, None, cot)
    with backend(backend_name):
        out, grads = _run(fn, inputs, flags, None, cot)
    res = Result(backend_name)
    names = [f"out{i}" for i in range(len(out))] + [f"grad{i}" for i, f in enumerate(flags) if f]
    for name, x, r, b in zip(names, out + grads, ref_out + ref_grads, base_out + base_grads):
        if x.dtype != b.dtype:
            res.errors[name] = (float("inf"), 0.0)
            res.ok = False
            continue
        slack = ulps * torch.finfo(b.dtype).eps * _max_abs(r) if ulps and b.is_floating_point() else 0.0
        err, bound = _max_err(x, r), 2 * _max_err(b, r) + tol + slack
        res.errors[name] = (err, bound)
        res.ok &= err <= bound
    return res


def check(fn: Callable, inputs: Sequence, backend_name: str, **kw) -> Result:
    """:func:`compare`, failing the test (with every error) when the rule does not hold."""
    res = compare(fn, inputs, backend_name, **kw)
    assert res.ok, str(res)
    return res


def second_derivatives(fn: Callable, inputs: Sequence, backend_name: str, seed: int = 0):
    """Double backward of ``fn`` on ``backend_name``: the gradient of ``<grad, v>`` with
    respect to every floating input, where ``grad`` is the first input gradient taken
    with ``create_graph=True`` for a random cotangent and ``v`` is random.

    Returns a list (one tensor per floating input, zeros where unused). Compare the
    result of a kernel backend with the ``torch`` backend's.
    """
    gen = torch.Generator().manual_seed(seed)
    args = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with backend(backend_name):
        outs = [o for o in _as_tuple(fn(*args)) if o.requires_grad]
        cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
        grads = torch.autograd.grad(outs, diff, cot, create_graph=True, allow_unused=True)
        pairs = [(g, torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)) for g in grads
                 if g is not None and g.requires_grad]
        total = sum((g * v).sum() for g, v in pairs)
        gg = torch.autograd.grad(total, diff, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(diff, gg)]


@contextlib.contextmanager
def saved_for_backward():
    """Collects every tensor autograd saves for backward inside the block (to check memory claims)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved

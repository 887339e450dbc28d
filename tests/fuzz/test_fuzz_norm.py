"""Property tests: layer_norm, rms_norm and their in-place forms (any rank, one or two
normalised dims, weight/bias absent, in the input's dtype, fp32 for half inputs or
expanded from one element, fused residual, eps down to 0) on every backend."""
import torch
from hypothesis import assume
from hypothesis import strategies as st

from llmfast.nn import functional as LF
from tests.fuzz.strategies import (DTYPES, check, clip, fuzz_tests, lay, layouts, same_as_torch, seeds, sizes,
                                   specials, tensor)

PARAM = ["none", "same", "same", "fp32", "expanded"]


@st.composite
def cases(draw, budget, nonfinite=True):
    rank = draw(st.integers(1, 3))
    k = draw(st.integers(1, min(rank, 2)))
    shape = [draw(sizes()) for _ in range(rank)]
    shape[-1] = max(shape[-1], 1) if draw(st.integers(0, 9)) else 0   # empty rows now and then
    return dict(shape=clip(shape, budget), k=k, dtype=draw(DTYPES), seed=draw(seeds()),
                plant=draw(specials(nonfinite=nonfinite)),
                weight=draw(st.sampled_from(PARAM)), bias=draw(st.sampled_from(PARAM)),
                eps=draw(st.sampled_from([1e-5, 1e-5, 1e-6, 0.1, 0.0, None])), residual=draw(st.booleans()),
                out=draw(st.booleans()), layout=draw(layouts()), offset=draw(st.sampled_from([0.0, 0.0, 100.0])))


def _param(case, kind, seed):
    nshape = case["shape"][-case["k"]:]
    if kind == "none":
        return None
    if kind == "expanded":
        return tensor((1,) * case["k"], case["dtype"], seed) + 1
    dtype = torch.float32 if kind == "fp32" and case["dtype"] != torch.float32 else case["dtype"]
    return tensor(nshape, dtype, seed).to(dtype) + 1


def _inputs(case, centered):
    x = tensor(case["shape"], case["dtype"], case["seed"], case["plant"], scale=2.0) + case["offset"]
    r = tensor(case["shape"], case["dtype"], case["seed"] + 3) if case["residual"] else None
    w = _param(case, case["weight"], case["seed"] + 1)
    b = _param(case, case["bias"], case["seed"] + 2) if centered else None
    if w is not None and b is not None:
        b = b.to(w.dtype)   # torch's layer_norm takes one dtype for both
    eps = case["eps"] if (case["eps"] is not None or not centered) else 1e-5
    return x, w, b, r, eps


def _prop(centered, inplace):
    def prop(backend, case):
        x, w, b, r, eps = _inputs(case, centered)
        # torch's layer_norm raises with float32 params for a half input when the input is empty,
        # and in backward when only the bias is given: no reference there
        mixed = centered and any(p is not None and p.dtype != x.dtype for p in (w, b))
        assume(not (mixed and (x.numel() == 0 or w is None)))
        nshape = case["shape"][-case["k"]:]
        exp = lambda p: None if p is None else p.expand(nshape)   # noqa: E731

        def f(x, w, b, r):
            x = lay(x, case["layout"])
            if inplace:
                out = torch.empty_like(x) if case["out"] else None
                if centered:
                    return LF.layer_norm_(x, nshape, exp(w), exp(b), eps, residual=r, out=out)
                return LF.rms_norm_(x, nshape, exp(w), eps, residual=r, out=out)
            if centered:
                return LF.layer_norm(x, nshape, exp(w), exp(b), eps, residual=r)
            return LF.rms_norm(x, nshape, exp(w), eps, residual=r)
        check(f, [x, w, b, r], backend, grad=not inplace)
        if not inplace:
            def theirs(x, w, b, r):
                s = x if r is None else x + r
                if centered:
                    y = torch.nn.functional.layer_norm(s, nshape, exp(w), exp(b), eps)
                else:
                    y = torch.nn.functional.rms_norm(s, nshape, exp(w), eps)
                return y if r is None else (y, s)
            if eps is not None:   # None is the math dtype's epsilon: float64's here, not the kernel's
                same_as_torch(lambda *a: f(*a), theirs, [x, w, b, r], rtol=1e-6, atol=1e-7)
    return prop


test_fuzz_layer_norm, test_fuzz_layer_norm_long = fuzz_tests("layer_norm", "layer_norm", cases, _prop(True, False))
test_fuzz_rms_norm, test_fuzz_rms_norm_long = fuzz_tests("rms_norm", "rms_norm", cases, _prop(False, False))
test_fuzz_layer_norm_, test_fuzz_layer_norm__long = fuzz_tests("layer_norm_", "layer_norm", cases, _prop(True, True))
test_fuzz_rms_norm_, test_fuzz_rms_norm__long = fuzz_tests("rms_norm_", "rms_norm", cases, _prop(False, True))

"""LayerNorm, and the fused residual add + LayerNorm: cases, providers, bytes moved.

Kinds: ``norm`` (torch: ``F.layer_norm``) and ``residual`` (torch: the eager
``s = x + r; F.layer_norm(s)`` a pre-norm block runs today; llmfast: one fused pass
returning both). Modes: ``fwd`` and ``fwd+bwd`` (backward of every output).

Bytes (the minimum traffic, s = bytes per element, M*N elements, params ignored):
forward reads x (and r) and writes y (and the sum): ``(2 + 2*res) * M*N*s``;
backward reads x and dy (and d_sum) and writes dx: ``(3 + res) * M*N*s``.
"""
import torch

from llmfast import backends
from llmfast.nn import functional as LF

OP = "layer_norm"

# (kind, mode, (M, N))
_FULL = [
    ("norm", "fwd", (8192, 4096)),
    ("norm", "fwd+bwd", (8192, 4096)),
    ("residual", "fwd", (8192, 4096)),
    ("residual", "fwd+bwd", (8192, 4096)),
    ("norm", "fwd", (32768, 1024)),
    ("norm", "fwd", (1024, 32768)),
    ("residual", "fwd", (16384, 2048)),
]
_QUICK = [
    ("norm", "fwd", (2048, 1024)),
    ("norm", "fwd+bwd", (2048, 1024)),
    ("residual", "fwd", (2048, 1024)),
    ("residual", "fwd+bwd", (2048, 1024)),
]


def cases(quick, device, dtypes):
    out = []
    for kind, mode, shape in (_QUICK if quick else _FULL):
        for dt in dtypes:
            out.append(dict(name=f"{kind} {mode} {shape[0]}x{shape[1]}", kind=kind, mode=mode, shape=shape, dtype=dt))
    return out


def providers(case, device):
    return ["torch_compile"]


def work(case):
    M, N = case["shape"]
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    res = case["kind"] == "residual"
    nbytes = (2 + 2 * res) * M * N * s
    if case["mode"] == "fwd+bwd":
        nbytes += (3 + res) * M * N * s
    return "GB/s", nbytes


def _inputs(case, device, dtype):
    M, N = case["shape"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return dict(x=rand(M, N), r=rand(M, N), w=rand(N), b=rand(N), dy=rand(M, N), ds=rand(M, N))


def _eager(kind):
    if kind == "residual":
        def fn(x, r, w, b):
            s = x + r
            return torch.nn.functional.layer_norm(s, (s.shape[-1],), w, b), s
        return fn
    return lambda x, r, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b)


def _llmfast(kind):
    if kind == "residual":
        return lambda x, r, w, b: LF.layer_norm(x, (x.shape[-1],), w, b, residual=r)
    return lambda x, r, w, b: LF.layer_norm(x, (x.shape[-1],), w, b)


def _wrap(fn, case, device, dtype=None):
    t = _inputs(case, device, dtype or case["dtype"])
    x, r, w, b = t["x"], t["r"], t["w"], t["b"]
    if case["mode"] == "fwd":
        def run():
            out = fn(x, r, w, b)
            return out[0] if isinstance(out, tuple) else out
        return run
    for p in (x, w, b):
        p.requires_grad_(True)

    def step():
        x.grad = w.grad = b.grad = None
        out = fn(x, r, w, b)
        if isinstance(out, tuple):
            torch.autograd.backward(list(out), [t["dy"], t["ds"]])
        else:
            out.backward(t["dy"])
        return x.grad
    return step


def setup(provider, case, device):
    if provider == "torch":
        return _wrap(_eager(case["kind"]), case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(_eager(case["kind"]), dynamic=False), case, device)
    backend = provider.split(":", 1)[1]
    inner = _llmfast(case["kind"])

    def fn(*args):
        with backends.backend(backend):
            return inner(*args)
    return _wrap(fn, case, device)


def reference(case, device):
    return _wrap(_eager(case["kind"]), case, device, dtype=torch.float64)()

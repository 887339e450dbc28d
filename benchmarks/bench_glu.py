"""Gated activations (swiglu, geglu; separate or packed gate/up): cases, providers, bytes moved.

Bytes (the minimum traffic, kernels/glu.py; s = bytes per element, M*N outputs): forward
reads gate and up and writes out, ``3*M*N*s``; backward reads dout, gate and up and
writes both gradients, ``5*M*N*s`` more.

Providers: torch has no fused gated activation, so ``torch`` and ``eager`` are both the
expression users write, ``F.silu(a) * b`` / ``F.gelu(a, approximate=...) * b`` (for the
packed kind on the two halves of ``x.chunk(2, -1)``); ``eager`` is listed so that
``llmfast bench --vs eager`` names it. ``torch_compile`` is that expression under
``torch.compile``; ``llmfast:<backend>`` runs ``llmfast.nn.functional.swiglu/geglu``.

Peak memory is measured for every provider (``MEMORY``): the fused backward keeps only
gate and up, where eager also keeps ``act(a)``. A ``fwd+bwd`` step returns its gradients
through ``torch.autograd.grad`` instead of accumulating ``.grad``, so no gradient of an
earlier call is alive when the next one is measured.
"""
import torch
import torch.nn.functional as tF

from llmfast import backends
from llmfast.nn import functional as LF

OP = "glu"
MEMORY = True

# (kind, mode, (M, N)): M tokens, N the intermediate size (Llama-7B's 11008)
_FULL = [
    ("swiglu", "fwd", (2048, 11008)),
    ("swiglu", "fwd+bwd", (2048, 11008)),
    ("swiglu packed", "fwd+bwd", (2048, 11008)),
    ("geglu", "fwd", (2048, 11008)),
    ("geglu", "fwd+bwd", (2048, 11008)),
]
_QUICK = [
    ("swiglu", "fwd", (256, 1024)),
    ("swiglu", "fwd+bwd", (256, 1024)),
    ("swiglu packed", "fwd+bwd", (256, 1024)),
    ("geglu", "fwd+bwd", (256, 1024)),
]


def cases(quick, device, dtypes):
    return [dict(name=f"{kind} {mode} {M}x{N}", kind=kind, mode=mode, shape=(M, N), dtype=dt)
            for kind, mode, (M, N) in (_QUICK if quick else _FULL) for dt in dtypes]


def providers(case, device):
    return ["eager", "torch_compile"]


def work(case):
    M, N = case["shape"]
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    return "GB/s", (3 + (5 if case["mode"] == "fwd+bwd" else 0)) * M * N * s


def _eager(kind):
    act = tF.silu if kind.startswith("swiglu") else (lambda a: tF.gelu(a, approximate="tanh"))
    if kind.endswith("packed"):
        def packed(x):
            a, b = x.chunk(2, -1)
            return act(a) * b
        return packed
    return lambda a, b: act(a) * b


def _llmfast(kind):
    if kind == "swiglu packed":
        return lambda x: LF.swiglu(x)
    if kind == "swiglu":
        return lambda a, b: LF.swiglu(a, b)
    return lambda a, b: LF.geglu(a, b, approximate="tanh")


def _wrap(fn, case, device, dtype=None):
    M, N = case["shape"]
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)
    inputs = [rand(M, 2 * N)] if case["kind"].endswith("packed") else [rand(M, N), rand(M, N)]
    dy = rand(M, N)
    if case["mode"] == "fwd":
        return lambda: fn(*inputs)
    for t in inputs:
        t.requires_grad_(True)

    def step():
        return torch.autograd.grad(fn(*inputs), inputs, dy)[0]
    return step


def setup(provider, case, device):
    kind = case["kind"]
    if provider in ("torch", "eager"):
        return _wrap(_eager(kind), case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(_eager(kind), dynamic=False), case, device)
    backend = provider.split(":", 1)[1]
    inner = _llmfast(kind)

    def fn(*args):
        with backends.backend(backend):
            return inner(*args)
    return _wrap(fn, case, device)


def reference(case, device):
    return _wrap(_eager(case["kind"]), case, device, dtype=torch.float64)()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def pair(device, dtype):
        return [torch.randn(3, 7, 781, device=device).to(dtype), torch.randn(3, 7, 781, device=device).to(dtype)]

    def packed(device, dtype):
        return [torch.randn(4, 9, 2 * 300, device=device).to(dtype)]

    return [
        ("glu swiglu", pair, lambda a, b: F.swiglu(a, b)),
        ("glu swiglu packed", packed, lambda x: F.swiglu(x)),
        ("glu geglu tanh", pair, lambda a, b: F.geglu(a, b)),
        ("glu geglu erf packed", packed, lambda x: F.geglu(x, approximate="none")),
    ]

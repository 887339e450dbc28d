"""fused_linear_cross_entropy vs cross_entropy(linear(...)): time and peak memory.

The baseline ``torch`` materialises the logits [N, V], their log_softmax and, in
backward, two more [N, V] tensors; the fused op holds one [chunk, V] buffer plus the
parameter-sized gradients. FLOPs: forward+backward is three [N, H] x [H, V] matmuls,
``6*N*H*V``; forward alone ``2*N*H*V``. The peak memory column (MEMORY = True) is
the point of this op; its time is the matmuls'.
"""
import math

import torch
import torch.nn.functional as TF

from llmfast import backends
from llmfast.nn import functional as LF

OP = "fused_linear_cross_entropy"
MEMORY = True

# (mode, N tokens, H hidden, V vocabulary)
_FULL = [
    ("fwd+bwd", 4096, 1024, 32000),
    ("fwd", 4096, 1024, 32000),
]
_QUICK = [
    ("fwd+bwd", 1024, 256, 8000),
]


def cases(quick, device, dtypes):
    out = []
    for mode, N, H, V in (_QUICK if quick else _FULL):
        for dt in dtypes:
            out.append(dict(name=f"{mode} N={N} H={H} V={V}", mode=mode, N=N, H=H, V=V, dtype=dt))
    return out


def providers(case, device):
    # torch.compile of the unfused expression still materialises the logits (the matmul
    # is an extern kernel) and on CPU mostly times the compiler: not a contender here.
    return []


def work(case):
    flops = 2 * case["N"] * case["H"] * case["V"]
    return "TFLOP/s", flops * (3 if case["mode"] == "fwd+bwd" else 1)


def _inputs(case, device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]
    h = torch.randn(case["N"], case["H"], generator=g).to(device=device, dtype=dt)
    w = (torch.randn(case["V"], case["H"], generator=g) / math.sqrt(case["H"])).to(device=device, dtype=dt)
    t = torch.randint(0, case["V"], (case["N"],), generator=g).to(device)
    t[::16] = -100
    return h, w, t


def _wrap(fn, case, device, dtype=None):
    h, w, t = _inputs(case, device, dtype)
    if case["mode"] == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(h, w, t)
        return fwd
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()
        return h.grad
    return step


def _torch_fn(h, w, t):
    return TF.cross_entropy(TF.linear(h, w), t)


def setup(provider, case, device):
    if provider == "torch":
        return _wrap(_torch_fn, case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(_torch_fn, dynamic=False), case, device)
    backend = provider.split(":", 1)[1]

    def fn(h, w, t):
        with backends.backend(backend):
            return LF.fused_linear_cross_entropy(h, w, t)
    return _wrap(fn, case, device)


def reference(case, device):
    return _wrap(_torch_fn, case, device, dtype=torch.float64)()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def make(N, H, V, bias=True):
        def inputs(device, dtype):
            h = torch.randn(N, H, device=device).to(dtype)
            w = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype)
            t = torch.randint(0, V, (N,), device=device)
            t[::5] = -100
            out = [h, w, t]
            if bias:
                out.append((torch.randn(V, device=device) * 0.1).to(dtype))
            return out
        return inputs

    return [
        ("fused_linear_cross_entropy mean", make(37, 64, 1000),
         lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, chunk_size=16)),
        ("fused_linear_cross_entropy sum+smooth", make(29, 32, 517, bias=False),
         lambda h, w, t: F.fused_linear_cross_entropy(h, w, t, reduction="sum", label_smoothing=0.1, chunk_size=8)),
        ("fused_linear_cross_entropy none", make(21, 32, 300),
         lambda h, w, t, b: F.fused_linear_cross_entropy(h, w, t, b, reduction="none", chunk_size=8)),
    ]

"""cross_entropy: cases, providers, bytes moved (and peak memory: MEMORY = True).

Bytes (the minimum traffic): forward reads the logits once, ``N*V*s`` (s = bytes per
logit; targets and the per-row results are O(N)); forward+backward adds reading the
logits and writing their gradient, ``2*N*V*s`` more. torch's eager path moves about
twice that (it writes log_softmax in forward, then a zero-filled nll gradient and the
log_softmax gradient in backward), and holds those [N, V] tensors: the peak memory
column shows it.
"""
import torch
import torch.nn.functional as TF

from llmfast import backends
from llmfast.nn import functional as LF

OP = "cross_entropy"
MEMORY = True

# (mode, N tokens, V vocabulary, label_smoothing)
_FULL = [
    ("fwd", 4096, 32000, 0.0),
    ("fwd+bwd", 4096, 32000, 0.0),
    ("fwd+bwd", 1024, 128256, 0.1),
]
_QUICK = [
    ("fwd", 1024, 32000, 0.0),
    ("fwd+bwd", 1024, 32000, 0.0),
    ("fwd+bwd", 256, 128256, 0.1),
]


def cases(quick, device, dtypes):
    out = []
    for mode, N, V, ls in (_QUICK if quick else _FULL):
        for dt in dtypes:
            name = f"{mode} N={N} V={V}" + (f" ls={ls}" if ls else "")
            out.append(dict(name=name, mode=mode, N=N, V=V, ls=ls, dtype=dt))
    return out


def providers(case, device):
    return ["torch_compile"]


def work(case):
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    n = case["N"] * case["V"] * s
    return "GB/s", n * (3 if case["mode"] == "fwd+bwd" else 1)


def _inputs(case, device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(case["N"], case["V"], generator=g) * 2).to(device=device, dtype=dtype or case["dtype"])
    t = torch.randint(0, case["V"], (case["N"],), generator=g).to(device)
    t[::16] = -100  # some padding
    return x, t


def _wrap(fn, case, device, dtype=None):
    x, t = _inputs(case, device, dtype)
    if case["mode"] == "fwd":
        return lambda: fn(x, t)
    x.requires_grad_(True)

    def step():
        x.grad = None
        fn(x, t).backward()
        return x.grad
    return step


def _torch_fn(case):
    return lambda x, t: TF.cross_entropy(x, t, label_smoothing=case["ls"])


def setup(provider, case, device):
    if provider == "torch":
        return _wrap(_torch_fn(case), case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(_torch_fn(case), dynamic=False), case, device)
    backend = provider.split(":", 1)[1]

    def fn(x, t):
        with backends.backend(backend):
            return LF.cross_entropy(x, t, label_smoothing=case["ls"])
    return _wrap(fn, case, device)


def reference(case, device):
    return _wrap(_torch_fn(case), case, device, dtype=torch.float64)()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def rows(C, N=13):
        def make(device, dtype):
            x = (torch.randn(N, C, device=device) * 2).to(dtype)
            t = torch.randint(0, C, (N,), device=device)
            t[::4] = -100
            return [x, t]
        return make

    def spatial(device, dtype):  # [N, C, d] with class dim 1
        return [torch.randn(3, 37, 5, device=device).to(dtype), torch.randint(0, 37, (3, 5), device=device)]

    def weighted(x, t):
        w = torch.linspace(0.5, 2.0, x.shape[-1], device=x.device)
        return F.cross_entropy(x, t, weight=w, label_smoothing=0.1)

    return [
        ("cross_entropy mean", rows(1000), lambda x, t: F.cross_entropy(x, t)),
        ("cross_entropy sum V=32001", rows(32001, 3), lambda x, t: F.cross_entropy(x, t, reduction="sum")),
        ("cross_entropy none", rows(2), lambda x, t: F.cross_entropy(x, t, reduction="none")),
        ("cross_entropy weight+smooth", rows(1000), weighted),
        ("cross_entropy [N,C,d]", spatial, lambda x, t: F.cross_entropy(x, t, label_smoothing=0.05)),
    ]

"""softmax / log_softmax / fused scale+mask+softmax: cases, providers, bytes moved.

Bytes (the minimum traffic): forward reads x and writes y, ``2*M*N*s`` (s = bytes
per element), plus the mask once (its broadcast dims count once); forward+backward
adds reading dy and y and writing dx, ``3*M*N*s`` more.

Providers: ``torch`` is ``torch.softmax`` / ``torch.log_softmax``, and for the fused
scale_mask_softmax the eager sequence users write, ``x*scale`` then ``masked_fill``
then softmax: torch has no single op for it, so that sequence is both the torch and the
``eager`` baseline (``llmfast bench --vs eager`` divides by it); ``torch_compile`` is
the same under ``torch.compile``. This file also holds the ``llmfast check`` cases of
softmax and log_softmax.
"""
import torch

from llmfast import backends
from llmfast.nn import functional as LF

OP = "softmax"

# (kind, mode, shape, mask shape or None): shape's last dim is the softmax dim
_FULL = [
    ("softmax", "fwd", (4096, 4096), None),
    ("softmax", "fwd+bwd", (4096, 4096), None),
    ("softmax", "fwd", (16384, 1024), None),
    ("softmax", "fwd", (256, 32768), None),
    ("softmax", "fwd", (4, 262144), None),
    ("log_softmax", "fwd", (4096, 4096), None),
    ("log_softmax", "fwd+bwd", (4096, 4096), None),
    ("scale_mask_softmax", "fwd", (16, 1024, 1024), (1024, 1024)),
    ("scale_mask_softmax", "fwd+bwd", (16, 1024, 1024), (1024, 1024)),
]
_QUICK = [
    ("softmax", "fwd", (1024, 1024), None),
    ("softmax", "fwd+bwd", (1024, 1024), None),
    ("log_softmax", "fwd", (1024, 1024), None),
    ("scale_mask_softmax", "fwd", (4, 512, 512), (512, 512)),
]


def cases(quick, device, dtypes):
    out = []
    for kind, mode, shape, mshape in (_QUICK if quick else _FULL):
        for dt in dtypes:
            name = f"{kind} {mode} {'x'.join(map(str, shape))}"
            out.append(dict(name=name, kind=kind, mode=mode, shape=shape, mask_shape=mshape, dtype=dt))
    return out


def providers(case, device):
    return ["torch_compile"]


def work(case):
    n = 1
    for d in case["shape"]:
        n *= d
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    nbytes = 2 * n * s
    if case["mask_shape"]:
        m = 1
        for d in case["mask_shape"]:
            m *= d
        nbytes += m  # bool
    if case["mode"] == "fwd+bwd":
        nbytes += 3 * n * s
    return "GB/s", nbytes


def _inputs(case, device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case["shape"], generator=g).to(device=device, dtype=dtype or case["dtype"])
    mask = None
    if case["mask_shape"]:
        mask = (torch.rand(case["mask_shape"], generator=g) > 0.2).to(device)
    dy = torch.randn(case["shape"], generator=g).to(device=device, dtype=dtype or case["dtype"])
    return x, mask, dy


def _torch_fn(kind, unfused):
    scale = 0.125
    if kind == "scale_mask_softmax":
        if unfused:  # the eager sequence users write today
            return lambda x, m: torch.softmax((x * scale).masked_fill(~m, float("-inf")), -1)
        return lambda x, m: LF.softmax(x, -1, scale=scale, mask=m)
    f = torch.softmax if kind == "softmax" else torch.log_softmax
    lf = LF.softmax if kind == "softmax" else LF.log_softmax
    return (lambda x, m: f(x, -1)) if unfused else (lambda x, m: lf(x, -1))


def _wrap(fn, case, device, dtype=None):
    x, mask, dy = _inputs(case, device, dtype)
    if case["mode"] == "fwd":
        return lambda: fn(x, mask)
    x.requires_grad_(True)

    def step():
        x.grad = None
        fn(x, mask).backward(dy)
        return x.grad
    return step


def setup(provider, case, device):
    kind = case["kind"]
    if provider == "torch":  # for scale_mask_softmax: the unfused eager sequence
        return _wrap(_torch_fn(kind, unfused=True), case, device)
    if provider == "torch_compile":
        return _wrap(torch.compile(_torch_fn(kind, unfused=True), dynamic=False), case, device)
    backend = provider.split(":", 1)[1]
    inner = _torch_fn(kind, unfused=False)

    def fn(x, m):
        with backends.backend(backend):
            return inner(x, m)
    return _wrap(fn, case, device)


def reference(case, device):
    fn = _wrap(_torch_fn(case["kind"], unfused=True), case, device, dtype=torch.float64)
    return fn()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def rows(device, dtype):
        return [torch.randn(2, 3, 9, 781, device=device).to(dtype)]

    def masked(device, dtype):
        x = torch.randn(2, 4, 9, 211, device=device).to(dtype)
        return [x, torch.rand(2, 1, 9, 211, device=device) > 0.3]

    return [
        ("softmax", rows, lambda x: F.softmax(x, -1)),
        ("softmax dim=1", rows, lambda x: F.softmax(x, 1)),
        ("softmax scale+mask", masked, lambda x, m: F.softmax(x, -1, scale=0.3, mask=m)),
        ("softmax causal", rows, lambda x: F.softmax(x, -1, is_causal=True)),
        ("log_softmax", rows, lambda x: F.log_softmax(x, -1)),
        ("log_softmax scale+mask", masked, lambda x, m: F.log_softmax(x, -1, scale=0.3, mask=m)),
    ]

"""What bench_layer_norm.py and bench_rms_norm.py share: cases, bytes moved, inputs.

Kinds: ``norm`` (torch: the ``torch.nn.functional`` norm), ``residual`` (torch: the
eager ``s = x + r; norm(s)`` a pre-norm block runs today; llmfast: one fused pass
returning both) and ``inplace`` (a decode loop's block boundary, forward only: torch
as for ``residual``, ``eager`` torch's in-place ``r += x; out.copy_(norm(r))``, llmfast
``rms_norm_``/``layer_norm_`` writing the sum into r and the output into a buffer: no
fresh allocation). Modes: ``fwd`` and ``fwd+bwd`` (backward of every output). An
in-place case keeps adding x into r round after round; the error column is the first
call's, on the case's inputs.

Bytes (the minimum traffic, s = bytes per element, M*N elements, params ignored):
forward reads x (and r) and writes y (and the sum): ``(2 + 2*res) * M*N*s``;
backward reads x and dy (and d_sum) and writes dx: ``(3 + res) * M*N*s``.
"""
import torch

from llmfast import backends

# (kind, mode, (M, N))
_FULL = [
    ("norm", "fwd", (8192, 4096)),
    ("norm", "fwd+bwd", (8192, 4096)),
    ("residual", "fwd", (8192, 4096)),
    ("residual", "fwd+bwd", (8192, 4096)),
    ("norm", "fwd", (32768, 1024)),
    ("norm", "fwd", (1024, 32768)),
    ("residual", "fwd", (16384, 2048)),
    ("inplace", "fwd", (8192, 4096)),
    ("inplace", "fwd", (16, 4096)),  # a decode step: 16 sequences, one token each
]
_QUICK = [
    ("norm", "fwd", (2048, 1024)),
    ("norm", "fwd+bwd", (2048, 1024)),
    ("residual", "fwd", (2048, 1024)),
    ("residual", "fwd+bwd", (2048, 1024)),
    ("inplace", "fwd", (2048, 1024)),
]


class NormBench:
    """The bench_<op> module functions for a norm.

    ``torch_norm(x, w, b)`` is torch's norm over the last dim, ``llmfast_norm(x, w, b,
    residual=None)`` llmfast's and ``llmfast_norm_(x, w, b, residual, out)`` its in-place
    form; ``params`` names the trainable parameters ("w", "b").
    """

    def __init__(self, torch_norm, llmfast_norm, llmfast_norm_, params):
        self.torch_norm, self.llmfast_norm, self.llmfast_norm_ = torch_norm, llmfast_norm, llmfast_norm_
        self.params = params

    @staticmethod
    def cases(quick, device, dtypes):
        return [dict(name=f"{kind} {mode} {M}x{N}", kind=kind, mode=mode, shape=(M, N), dtype=dt)
                for kind, mode, (M, N) in (_QUICK if quick else _FULL) for dt in dtypes]

    @staticmethod
    def providers(case, device):
        return ["eager", "torch_compile"] if case["kind"] == "inplace" else ["torch_compile"]

    @staticmethod
    def work(case):
        M, N = case["shape"]
        s = torch.tensor([], dtype=case["dtype"]).element_size()
        res = case["kind"] != "norm"
        nbytes = (2 + 2 * res) * M * N * s
        if case["mode"] == "fwd+bwd":
            nbytes += (3 + res) * M * N * s
        return "GB/s", nbytes

    def _eager(self, kind):
        norm = self.torch_norm
        if kind in ("residual", "inplace"):
            def fn(x, r, w, b):
                s = x + r
                return norm(s, w, b), s
            return fn
        return lambda x, r, w, b: norm(x, w, b)

    def _inplace_eager(self):
        norm = self.torch_norm

        def fn(x, r, w, b, out):
            r.add_(x)
            return out.copy_(norm(r, w, b))
        return fn

    def _llmfast(self, kind):
        norm = self.llmfast_norm
        if kind == "inplace":
            norm_ = self.llmfast_norm_
            return lambda x, r, w, b, out: norm_(x, w, b, r, out)[0]
        if kind == "residual":
            return lambda x, r, w, b: norm(x, w, b, residual=r)
        return lambda x, r, w, b: norm(x, w, b)

    def _wrap(self, fn, case, device, dtype=None, inplace=False):
        """A no-argument callable running ``fn`` on the case's inputs; ``inplace``: fn takes
        (x, r, w, b, out) and writes r and a preallocated out."""
        M, N = case["shape"]
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape):
            return torch.randn(shape, generator=g).to(device=device, dtype=dtype or case["dtype"])
        x, r, dy, ds = rand(M, N), rand(M, N), rand(M, N), rand(M, N)
        p = dict(w=rand(N), b=rand(N))
        w, b = p["w"], p["b"]
        if inplace:
            out = torch.empty_like(x)
            return lambda: fn(x, r, w, b, out)
        if case["mode"] == "fwd":
            def run():
                out = fn(x, r, w, b)
                return out[0] if isinstance(out, tuple) else out
            return run
        trainable = [x] + [p[k] for k in self.params]
        for t in trainable:
            t.requires_grad_(True)

        def step():
            for t in trainable:
                t.grad = None
            out = fn(x, r, w, b)
            if isinstance(out, tuple):
                torch.autograd.backward(list(out), [dy, ds])
            else:
                out.backward(dy)
            return x.grad
        return step

    def setup(self, provider, case, device):
        if provider == "torch":
            return self._wrap(self._eager(case["kind"]), case, device)
        if provider == "torch_compile":
            return self._wrap(torch.compile(self._eager(case["kind"]), dynamic=False), case, device)
        if provider == "eager":
            return self._wrap(self._inplace_eager(), case, device, inplace=True)
        backend = provider.split(":", 1)[1]
        inner = self._llmfast(case["kind"])

        def fn(*args):
            with backends.backend(backend):
                return inner(*args)
        return self._wrap(fn, case, device, inplace=case["kind"] == "inplace")

    def reference(self, case, device):
        return self._wrap(self._eager(case["kind"]), case, device, dtype=torch.float64)()

    def module_api(self):
        """(cases, providers, work, setup, reference) for a bench_<op> module."""
        return self.cases, self.providers, self.work, self.setup, self.reference


def inplace_check(norm_):
    """An ``llmfast check`` function for the in-place norm ``norm_(x, r, *params)``: it runs
    on detached copies (no autograd, so the kernel itself runs, and the check's inputs stay
    as they were) and returns (out, residual) for the forward comparison."""
    def fn(x, r, *params):
        x, r = x.detach().clone(), r.detach().clone()
        return norm_(x, r, *(p.detach() for p in params))
    return fn

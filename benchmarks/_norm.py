"""What bench_layer_norm.py and bench_rms_norm.py share: cases, bytes moved, inputs.

Kinds: ``norm`` (torch: the ``torch.nn.functional`` norm) and ``residual`` (torch: the
eager ``s = x + r; norm(s)`` a pre-norm block runs today; llmfast: one fused pass
returning both). Modes: ``fwd`` and ``fwd+bwd`` (backward of every output).

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
]
_QUICK = [
    ("norm", "fwd", (2048, 1024)),
    ("norm", "fwd+bwd", (2048, 1024)),
    ("residual", "fwd", (2048, 1024)),
    ("residual", "fwd+bwd", (2048, 1024)),
]


class NormBench:
    """The bench_<op> module functions for a norm.

    ``torch_norm(x, w, b)`` is torch's norm over the last dim, ``llmfast_norm(x, w, b,
    residual=None)`` llmfast's; ``params`` names the trainable parameters ("w", "b").
    """

    def __init__(self, torch_norm, llmfast_norm, params):
        self.torch_norm, self.llmfast_norm, self.params = torch_norm, llmfast_norm, params

    @staticmethod
    def cases(quick, device, dtypes):
        return [dict(name=f"{kind} {mode} {M}x{N}", kind=kind, mode=mode, shape=(M, N), dtype=dt)
                for kind, mode, (M, N) in (_QUICK if quick else _FULL) for dt in dtypes]

    @staticmethod
    def providers(case, device):
        return ["torch_compile"]

    @staticmethod
    def work(case):
        M, N = case["shape"]
        s = torch.tensor([], dtype=case["dtype"]).element_size()
        res = case["kind"] == "residual"
        nbytes = (2 + 2 * res) * M * N * s
        if case["mode"] == "fwd+bwd":
            nbytes += (3 + res) * M * N * s
        return "GB/s", nbytes

    def _eager(self, kind):
        norm = self.torch_norm
        if kind == "residual":
            def fn(x, r, w, b):
                s = x + r
                return norm(s, w, b), s
            return fn
        return lambda x, r, w, b: norm(x, w, b)

    def _llmfast(self, kind):
        norm = self.llmfast_norm
        if kind == "residual":
            return lambda x, r, w, b: norm(x, w, b, residual=r)
        return lambda x, r, w, b: norm(x, w, b)

    def _wrap(self, fn, case, device, dtype=None):
        M, N = case["shape"]
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape):
            return torch.randn(shape, generator=g).to(device=device, dtype=dtype or case["dtype"])
        x, r, dy, ds = rand(M, N), rand(M, N), rand(M, N), rand(M, N)
        p = dict(w=rand(N), b=rand(N))
        w, b = p["w"], p["b"]
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
        backend = provider.split(":", 1)[1]
        inner = self._llmfast(case["kind"])

        def fn(*args):
            with backends.backend(backend):
                return inner(*args)
        return self._wrap(fn, case, device)

    def reference(self, case, device):
        return self._wrap(self._eager(case["kind"]), case, device, dtype=torch.float64)()

    def module_api(self):
        """(cases, providers, work, setup, reference) for a bench_<op> module."""
        return self.cases, self.providers, self.work, self.setup, self.reference

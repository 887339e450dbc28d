"""LayerNorm, and the fused residual add + LayerNorm: cases, providers, bytes moved.

torch: ``F.layer_norm`` (and ``s = x + r; F.layer_norm(s)`` for the residual kind);
llmfast: ``llmfast.nn.functional.layer_norm(..., residual=r)``. Cases, modes and the
bytes formula are shared with RMSNorm (benchmarks/_norm.py).
"""
import torch

from llmfast.benchmarks._norm import NormBench, inplace_check
from llmfast.nn import functional as LF

OP = "layer_norm"

cases, providers, work, setup, reference = NormBench(
    torch_norm=lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b),
    llmfast_norm=lambda x, w, b, residual=None: LF.layer_norm(x, (x.shape[-1],), w, b, residual=residual),
    llmfast_norm_=lambda x, w, b, r, out: LF.layer_norm_(x, (x.shape[-1],), w, b, residual=r, out=out),
    params=("w", "b"),
).module_api()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def affine(n, wdtype=None):
        def make(device, dtype):
            wd = wdtype or dtype
            return [torch.randn(3, 7, n, device=device).to(dtype), torch.randn(n, device=device).to(wd),
                    torch.randn(n, device=device).to(wd)]
        return make

    def with_residual(device, dtype):
        return [torch.randn(4, 9, 1000, device=device).to(dtype), torch.randn(4, 9, 1000, device=device).to(dtype),
                torch.randn(1000, device=device).to(dtype), torch.randn(1000, device=device).to(dtype)]

    def plain(device, dtype):
        return [torch.randn(5, 6, 16, 24, device=device).to(dtype) * 3 + 100]

    return [
        ("layer_norm", affine(781), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
        ("layer_norm fp32 params", affine(512, torch.float32), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
        ("layer_norm residual", with_residual, lambda x, r, w, b: F.layer_norm(x, (1000,), w, b, residual=r)),
        ("layer_norm in place residual", with_residual,
         inplace_check(lambda x, r, w, b: F.layer_norm_(x, (1000,), w, b, residual=r))),
        ("layer_norm 2-D shape", plain, lambda x: F.layer_norm(x, (16, 24))),
        ("layer_norm long row", affine(10000), lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
    ]

"""RMSNorm, and the fused residual add + RMSNorm: cases, providers, bytes moved.

torch: ``F.rms_norm`` (and ``s = x + r; F.rms_norm(s)`` for the residual kind), eps
1e-6 as Llama uses; llmfast: ``llmfast.nn.functional.rms_norm(..., residual=r)`` (and ``rms_norm_`` in place).
Cases, modes and the bytes formula are shared with LayerNorm (benchmarks/_norm.py).
"""
import torch

from llmfast.benchmarks._norm import NormBench, inplace_check
from llmfast.nn import functional as LF

OP = "rms_norm"

cases, providers, work, setup, reference = NormBench(
    torch_norm=lambda x, w, b: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6),
    llmfast_norm=lambda x, w, b, residual=None: LF.rms_norm(x, (x.shape[-1],), w, 1e-6, residual=residual),
    llmfast_norm_=lambda x, w, b, r, out: LF.rms_norm_(x, (x.shape[-1],), w, 1e-6, residual=r, out=out),
    params=("w",),
).module_api()


# ----------------------------------------------------------------------------------
# llmfast check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.nn import functional as F

    def weighted(n, wdtype=None):
        def make(device, dtype):
            return [torch.randn(3, 7, n, device=device).to(dtype), torch.randn(n, device=device).to(wdtype or dtype)]
        return make

    def with_residual(device, dtype):
        return [torch.randn(4, 9, 1000, device=device).to(dtype), torch.randn(4, 9, 1000, device=device).to(dtype),
                torch.randn(1000, device=device).to(dtype)]

    def plain(device, dtype):
        return [torch.randn(5, 6, 16, 24, device=device).to(dtype)]

    return [
        ("rms_norm", weighted(781), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
        ("rms_norm fp32 weight", weighted(512, torch.float32), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
        ("rms_norm residual", with_residual, lambda x, r, w: F.rms_norm(x, (1000,), w, 1e-6, residual=r)),
        ("rms_norm in place residual", with_residual,
         inplace_check(lambda x, r, w: F.rms_norm_(x, (1000,), w, 1e-6, residual=r))),
        ("rms_norm 2-D shape", plain, lambda x: F.rms_norm(x, (16, 24), eps=1e-6)),
        ("rms_norm long row", weighted(10000), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
    ]

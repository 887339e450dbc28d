"""RMSNorm, and the fused residual add + RMSNorm: cases, providers, bytes moved.

torch: ``F.rms_norm`` (and ``s = x + r; F.rms_norm(s)`` for the residual kind), eps
1e-6 as Llama uses; llmfast: ``llmfast.nn.functional.rms_norm(..., residual=r)``.
Cases, modes and the bytes formula are shared with LayerNorm (benchmarks/_norm.py).
"""
import torch

from llmfast.benchmarks._norm import NormBench
from llmfast.nn import functional as LF

OP = "rms_norm"

cases, providers, work, setup, reference = NormBench(
    torch_norm=lambda x, w, b: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6),
    llmfast_norm=lambda x, w, b, residual=None: LF.rms_norm(x, (x.shape[-1],), w, 1e-6, residual=residual),
    params=("w",),
).module_api()

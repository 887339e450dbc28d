"""LayerNorm, and the fused residual add + LayerNorm: cases, providers, bytes moved.

torch: ``F.layer_norm`` (and ``s = x + r; F.layer_norm(s)`` for the residual kind);
llmfast: ``llmfast.nn.functional.layer_norm(..., residual=r)``. Cases, modes and the
bytes formula are shared with RMSNorm (benchmarks/_norm.py).
"""
import torch

from llmfast.benchmarks._norm import NormBench
from llmfast.nn import functional as LF

OP = "layer_norm"

cases, providers, work, setup, reference = NormBench(
    torch_norm=lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b),
    llmfast_norm=lambda x, w, b, residual=None: LF.layer_norm(x, (x.shape[-1],), w, b, residual=residual),
    params=("w", "b"),
).module_api()

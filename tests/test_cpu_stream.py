"""The CPU kernels' streamed-output path (csrc/cpu/stream.h).

Outputs at least ``llmfast._C.cpu_stream_bytes`` large (the last-level cache size) are
finished in scratch rows and written with streaming stores. That threshold is tens of
MB, so a child process lowers it with LLMFAST_CPU_STREAM_BYTES and runs small cases
through the path (norms, softmax, the cross-entropy gradient): rows whose length is not a multiple of the 64-byte store (unaligned
heads and tails), fp32 and bf16, with and without the residual, forward and every
gradient, against the float64 reference.
"""
import os
import subprocess
import sys
import textwrap

import pytest

import llmfast

pytestmark = pytest.mark.skipif(llmfast.available("layer_norm", "cpu")["cpu"] is not None,
                                reason="the cpu backend is not built")

CHILD = textwrap.dedent("""
    import torch, llmfast
    from llmfast.nn import functional as LF
    from llmfast.testing import compare
    assert llmfast._C.cpu_stream_bytes == 1024, llmfast._C.cpu_stream_bytes
    torch.manual_seed(0)
    fails = []
    for n in (1, 13, 64, 1000, 4099):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(37, n).to(dtype)
            r, w, b = torch.randn_like(x), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            cases = {
                "layer_norm": (lambda x, w, b: LF.layer_norm(x, (n,), w, b), [x, w, b]),
                "layer_norm residual": (lambda x, r, w, b: LF.layer_norm(x, (n,), w, b, residual=r), [x, r, w, b]),
                "rms_norm": (lambda x, w: LF.rms_norm(x, (n,), w), [x, w]),
                "rms_norm residual": (lambda x, r, w: LF.rms_norm(x, (n,), w, residual=r), [x, r, w]),
            }
            m = torch.rand(37, n) > 0.3
            m[5] = False  # a fully masked row takes the zero-fill path
            cases.update({
                "softmax": (lambda x: LF.softmax(x, -1), [x]),
                "log_softmax": (lambda x: LF.log_softmax(x, -1), [x]),
                "softmax masked": (lambda x: LF.softmax(x, -1, mask=m), [x]),
                "log_softmax causal": (lambda x: LF.log_softmax(x, -1, is_causal=True), [x]),
            })
            if n > 1:
                t = torch.randint(0, n, (37,))
                t[3] = -100  # an ignored row is zero-filled, not streamed
                for red in ("none", "mean"):
                    cases[f"cross_entropy {red}"] = (
                        lambda x, red=red, t=t: LF.cross_entropy(x, t, reduction=red, label_smoothing=0.1), [x])
            for name, (fn, args) in cases.items():
                res = compare(fn, args, "cpu")
                if not res.ok:
                    fails.append(f"{name} n={n} {dtype}: {res}")
    print("\\n".join(fails) or "ok")
    raise SystemExit(1 if fails else 0)
""")


def test_streamed_outputs_match_reference():
    env = dict(os.environ, LLMFAST_CPU_STREAM_BYTES="1024")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The CUDA kernels on the CPU warp emulator (llmfast._emu): what the per-op tests don't cover.

The per-op tests run the emulated kernels through the op layer (``backends_for(op,
emu=True)``); here are the raw ``torch.ops.llmfast_emu`` ops themselves: torch.library's
consistency checks, the bindings' argument checks, and calls from several threads at once.
"""
import threading

import pytest
import torch

import llmfast
from llmfast.ops._library import emulator

pytestmark = pytest.mark.skipif(emulator()[0] is None, reason=str(emulator()[1]))

emu = torch.ops.llmfast_emu


def _xent_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g)
    t = torch.randint(0, 37, (5,), generator=g)
    t[1] = -100
    return x, t, torch.rand(37, generator=g) + 0.5


def test_opcheck_softmax_and_cross_entropy():
    x = torch.randn(1, 2, 3, 17, requires_grad=True)
    mask = torch.rand(1, 2, 3, 17, generator=torch.Generator().manual_seed(1)) > 0.3
    torch.library.opcheck(emu.softmax_fwd, (x, 0.5, mask, False, True))
    torch.library.opcheck(emu.softmax_fwd, (x, 1.0, None, True, False))
    y = torch.randn(1, 2, 3, 17).softmax(-1)
    torch.library.opcheck(emu.softmax_bwd, (torch.randn(1, 2, 3, 17), y, 1.0, False, True))
    x, t, w = _xent_args()
    for weight, eps in ((None, 0.0), (w, 0.1)):
        torch.library.opcheck(emu.cross_entropy_fwd, (x.clone().requires_grad_(True), t, weight, -100, eps))
        _, lse = emu.cross_entropy_fwd(x, t, weight, -100, eps)
        torch.library.opcheck(emu.cross_entropy_bwd, (torch.randn(5), x, t, weight, lse, -100, eps))
        torch.library.opcheck(emu.cross_entropy_fwd_grad, (x.clone(), t, weight, -100, eps))


def test_bad_input_names_op_and_argument():
    x4 = torch.randn(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match=r"llmfast::softmax_fwd \(cuda\): input must be float32, float16 or bf"):
        emu.softmax_fwd(x4.double(), 1.0, None, False, False)
    with pytest.raises(RuntimeError, match="llmfast::softmax_fwd: mask has unsupported dtype"):
        emu.softmax_fwd(x4, 1.0, torch.ones(1, 1, 2, 8, dtype=torch.int32), False, False)
    with pytest.raises(RuntimeError, match="llmfast::softmax_bwd: grad_out has shape"):
        emu.softmax_bwd(x4[..., :4], x4, 1.0, False, False)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="llmfast::norm_fwd: bias is a LayerNorm parameter"):
        emu.norm_fwd(x, None, None, torch.ones(8), 1e-5, False)
    with pytest.raises(RuntimeError, match=r"llmfast::norm_fwd: weight must have shape \[8\]"):
        emu.norm_fwd(x, None, torch.ones(7), None, 1e-5, True)
    _, _, mean, rstd = emu.norm_fwd(x, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"llmfast::norm_bwd: rstd must be a \[4\] Float tensor"):
        emu.norm_bwd(x, None, x, None, mean, rstd[:3], True, False, False)
    lx, t, _ = _xent_args()
    with pytest.raises(RuntimeError, match="llmfast::cross_entropy_fwd: target must be a"):
        emu.cross_entropy_fwd(lx, t.int(), None, -100, 0.0)
    with pytest.raises(RuntimeError, match=r"llmfast::cross_entropy_fwd: label_smoothing must be in \[0, 1\]"):
        emu.cross_entropy_fwd(lx, t, None, -100, 1.5)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="llmfast::attention_fwd: dropout_p must be in"):
        emu.attention_fwd(q, q, q, None, 0.25, False, 1.5, 0)


def test_calls_from_several_threads():
    # launches from several torch threads at once: each sees its own emulator state (and the
    # static __shared__ arrays are shared behind one lock), so results equal the serial ones
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 2000, generator=g) for _ in range(4)] + [torch.randn(5, 300, generator=g) for _ in range(4)]
    with llmfast.backend("cuda"):
        serial = [llmfast.nn.functional.softmax(x, -1) for x in xs]
    out = [None] * len(xs)

    def run(i):
        with llmfast.backend("cuda"):
            out[i] = llmfast.nn.functional.softmax(xs[i], -1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(out, serial):
        assert torch.equal(a, b)

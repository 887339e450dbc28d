"""Every trainable llmfast op under activation checkpointing, torch.compile, and FSDP2.

``AllOps`` is one residual block that goes through each op of ``llmfast.nn.functional``
with trainable parameters around it: layer_norm, rms_norm (fused residual), rotary
embedding, flash_attention (with dropout: its mask must be regenerated on recomputation),
scaled_dot_product_attention, softmax / log_softmax, swiglu, geglu, cross_entropy and
fused_linear_cross_entropy.

* ``torch.utils.checkpoint`` (use_reentrant=False) recomputes the forward in backward;
  llmfast's ops are deterministic and draw dropout seeds from torch's generator (which
  checkpoint restores), so the gradients equal the uncheckpointed ones bitwise.
* torch.compile(fullgraph=True) of an llmfast op inside a checkpointed region.
* fully_shard on 2 gloo ranks, each block checkpointed, gives the 1-process gradients.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

import llmfast.nn.functional as F

C, H, V = 32, 4, 48


class AllOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(C)
        self.rms = torch.nn.RMSNorm(C)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.gate_up = torch.nn.Linear(C, 4 * C)
        self.down = torch.nn.Linear(C, C)
        self.head = torch.nn.Parameter(torch.randn(V, C) * 0.1)
        D = C // H
        ang = torch.outer(torch.arange(64.0), 1.0 / 100 ** (torch.arange(0, D, 2.0) / D))   # [64, D/2]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def block(self, x):
        B, L, _ = x.shape
        h = F.layer_norm(x, (C,), self.ln.weight, self.ln.bias)
        q, k, v = self.qkv(h).view(B, L, 3, H, C // H).unbind(2)
        q, k = F.rotary_embedding(q, self.cos, self.sin), F.rotary_embedding(k, self.cos, self.sin)
        a = F.flash_attention(q, k, v, causal=True, dropout_p=0.1)
        b = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        y = a.reshape(B, L, C) + b.transpose(1, 2).reshape(B, L, C)
        h, x = F.rms_norm(y, (C,), self.rms.weight, residual=x)   # (norm(x + y), x + y)
        g1, u1, g2, u2 = self.gate_up(h).chunk(4, dim=-1)
        m = F.swiglu(g1, u1) + F.geglu(g2, u2)
        m = m * F.softmax(m, dim=-1) + F.log_softmax(m, dim=-1) * 1e-2
        return x + self.down(m)

    def forward(self, x, target, ckpt=False):
        x = checkpoint(self.block, x, use_reentrant=False) if ckpt else self.block(x)
        h = x.reshape(-1, C)
        return (F.fused_linear_cross_entropy(h, self.head, target.reshape(-1))
                + F.cross_entropy(h @ self.head.t(), target.reshape(-1)))


def _inputs(B=2, L=13):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, L, C, generator=g), torch.randint(0, V, (B, L), generator=g)


def _grads(model, x, y, ckpt):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(11)   # the dropout mask's seed
    model(x, y, ckpt).backward()
    return {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.usefixtures("one_thread")
def test_checkpointed_grads_equal_plain():
    torch.manual_seed(0)
    model, (x, y) = AllOps(), _inputs()
    want, got = _grads(model, x, y, False), _grads(model, x, y, True)
    assert want.keys() == got.keys()
    for n in want:
        assert want[n] is not None and want[n].abs().sum() > 0, n
        assert torch.equal(got[n], want[n]), f"{n}: max diff {(got[n] - want[n]).abs().max()}"


@pytest.mark.usefixtures("one_thread")
def test_compiled_op_inside_checkpoint():
    torch.manual_seed(0)
    w = torch.randn(C, requires_grad=True)
    x = torch.randn(3, 7, C, requires_grad=True)

    def f(x, w):
        h, r = F.rms_norm(x, (C,), w, residual=x * 2)
        return F.softmax(h, dim=-1) * r

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref = f(x, w)
    gx, gw = torch.autograd.grad(ref.square().sum(), (x, w))
    out = checkpoint(compiled, x, w, use_reentrant=False)
    cx, cw = torch.autograd.grad(out.square().sum(), (x, w))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cx, gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cw, gw, atol=1e-5, rtol=1e-5)


def _fsdp_worker(rank, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = AllOps()
        fully_shard(model)
        x, y = _inputs(B=4)
        half = slice(2 * rank, 2 * rank + 2)
        x = x[half].clone().requires_grad_()
        torch.manual_seed(11)
        model(x, y[half], True).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}   # DTensor shards -> whole
        torch.save(dict(grads=grads, x=x.grad), os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow   # ~25 s: two spawned processes importing torch
@pytest.mark.usefixtures("one_thread")
def test_fsdp2_checkpointed_matches_one_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model, (x, y) = AllOps(), _inputs(B=4)
    parts = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2)]
    # FSDP averages the ranks' gradients of their half-batch means. Dropout draws its mask per
    # rank (seed 11 on 2 rows each), so the reference runs the two halves alone and averages.
    for part in parts:
        torch.testing.assert_close(part["grads"], parts[0]["grads"], atol=0, rtol=0)   # every rank, same grads
    want = {n: 0 for n, _ in model.named_parameters()}
    for r in range(2):
        g = _grads(model, x[2 * r:2 * r + 2], y[2 * r:2 * r + 2], True)
        torch.testing.assert_close(parts[r]["x"], g["x"], atol=1e-6, rtol=1e-5)
        for n in want:
            want[n] = want[n] + g[n] / 2
    for n in want:
        torch.testing.assert_close(parts[0]["grads"][n], want[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")

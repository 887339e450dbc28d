"""Gated activations (SwiGLU, GeGLU): one kernel, the activation a switch.

    out = act(gate) * up,   act = silu | gelu (tanh approximation) | gelu (erf)

The kernels see a canonical problem: ``gate`` [M, K] with unit column stride and any
row stride, and either ``up`` [M, N] like it (K = N), or no ``up``: the *packed* form,
where ``gate`` is one [M, 2N] projection (a fused ``gate_up_proj``), gate = its first N
columns and up = its last N. A packed projection is read in place (no split copies),
and its gradient comes back as one [M, 2N] tensor, not two halves glued by autograd.

Backward saves only ``gate`` and ``up`` (the inputs, alive anyway as the projections'
outputs) and recomputes ``act(gate)`` and ``act'(gate)`` from them: eager
``silu(a) * b`` also keeps ``silu(a)``, one more [M, N] tensor between forward and
backward. Math is fp32 for fp16/bf16 inputs (fp64 for fp64 on the cpu backend), each
output rounded once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, grads_by_recompute, kernel

# The activation switch, as the kernels number it (a compile-time constant there).
SILU, GELU_TANH, GELU = 0, 1, 2
ACTIVATIONS = {"silu": SILU, "gelu_tanh": GELU_TANH, "gelu": GELU}


def _act_torch(x: Tensor, act: int) -> Tensor:
    if act == SILU:
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="tanh" if act == GELU_TANH else "none")


def _halves(gate: Tensor, up: Optional[Tensor]):
    if up is None:
        return gate.chunk(2, dim=-1)
    return gate, up


def reference(gate: Tensor, up: Optional[Tensor], act: int) -> Tensor:
    """``act(gate) * up`` in torch ops (packed when ``up`` is None): the torch backend and double backward."""
    g, u = _halves(gate, up)
    return _act_torch(g, act) * u


def _fwd_fake(gate, up, act):
    M, K = gate.shape
    return gate.new_empty((M, K // 2 if up is None else K))


def _bwd_fake(grad_out, gate, up, act):
    M, K = gate.shape
    return gate.new_empty((M, K)), gate.new_empty((0,) if up is None else (M, K))


def _setup_context(ctx, inputs, output):
    gate, up, act = inputs
    ctx.act = act
    ctx.save_for_backward(gate, up)


def _backward(ctx, bwd, grad):
    gate, up = ctx.saved_tensors
    need_gate, need_up, _ = ctx.needs_input_grad
    if create_graph():  # double backward ahead: the same maths in differentiable torch ops
        dg, du = grads_by_recompute(lambda g, u: reference(g, u, ctx.act), [gate, up],
                                    [need_gate, need_up and up is not None], [grad])
        return dg, du, None
    g = grad if (grad.shape[1] <= 1 or grad.stride(1) == 1) else grad.contiguous()
    dg, du = bwd(g.to(gate.dtype), gate, up, ctx.act)
    return (dg if need_gate else None), (du if (need_up and up is not None) else None), None


# grad_out: [M, N], unit column stride, any row stride, gate's dtype. Returns (grad_gate,
# grad_up): packed (up None), grad_gate is the packed tensor's gradient [M, 2N] and grad_up
# an empty tensor; otherwise both [M, N]. All contiguous, in gate's dtype.
glu_bwd = kernel("glu_bwd", "(Tensor grad_out, Tensor gate, Tensor? up, int act) -> (Tensor, Tensor)", _bwd_fake,
                 triton="glu:glu_bwd")
# gate: [M, K], unit column stride, any row stride; up: None (packed: K = 2N, gate = the
# first N columns, up = the last N) or [M, N] of gate's dtype, unit column stride, any row
# stride. act: SILU (0), GELU_TANH (1), GELU (2). Returns out [M, N] contiguous.
glu_fwd = kernel("glu_fwd", "(Tensor gate, Tensor? up, int act) -> Tensor", _fwd_fake, triton="glu:glu_fwd",
                 autograd=(glu_bwd, _setup_context, _backward))

backends.register_op(OpSpec("glu", kernel=glu_fwd))


def _rows(t: Tensor, K: int) -> Tensor:
    """``t`` as [M, K] with unit column stride: a view when the layout allows, else a copy."""
    t2 = t.reshape(-1, K)
    if K > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def glu(gate: Tensor, up: Optional[Tensor], act: int) -> Tensor:
    """``act(gate) * up`` over any leading shape; ``up=None``: ``gate`` is packed [..., 2N].

    Arguments are assumed checked (``llmfast.nn.functional`` does that): same shapes (or
    an even last dim when packed), dtypes and devices.
    """
    which = backends.resolve("glu", gate)
    if which == "torch" or gate.numel() == 0:
        return reference(gate, up, act)
    K = gate.shape[-1]
    out_shape = gate.shape[:-1] + (K // 2 if up is None else K,)
    g2 = _rows(gate, K)
    u2 = None if up is None else _rows(up, K)
    return glu_fwd.on(which, gate.device.type)(g2, u2, act).view(out_shape)

"""Rotary position embedding (RoPE): one rotation kernel, forward and backward.

Each pair ``(x1, x2)`` of the first ``R = rotary_dim`` features of a head is rotated by its
angle; features ``R..D`` pass through:

    o1 = x1 * cos1 - x2 * sin1,    o2 = x2 * cos2 + x1 * sin2

Pairing: GPT-NeoX / Llama (``interleaved=False``) pairs feature ``i`` with ``i + R/2``;
GPT-J (``interleaved=True``) pairs ``2i`` with ``2i + 1``. The angles come in one of two
layouts, told apart by the width ``W`` of ``cos``/``sin``:

* ``W = R/2`` (flash-attn's ``rotary_embedding``): one angle per pair, cos1 = cos2 = cos[i];
* ``W = R`` (Hugging Face's ``cat(freqs, freqs)``): one value per feature, each element of a
  pair reads its own (cos1 = cos[e1], cos2 = cos[e2], the same for sin). That is HF's
  ``x * cos + rotate_half(x) * sin`` exactly, for any cos/sin, duplicated or not.

Backward is the transpose of this linear map: ``dx1 = g1 * cos1 + g2 * sin2``,
``dx2 = g2 * cos2 - g1 * sin1``. That is the same kernel with the sines negated and the two
elements' sines swapped (for ``W = R/2``, sin1 = sin2: the rotation by -theta), so the
backward kernel is the forward one with ``conj=True``. Nothing but cos and sin is saved
for backward: the gradient does not depend on q or k.

Canonical problem of the kernels: ``q`` [B, S, Hq, D] and ``k`` [B, S, Hk, D] (GQA: any
head counts; k optional) with unit stride along D and any other strides (HF's q is the
transposed view of a [B, S, H, D] projection: read in place, no copy); ``cos``/``sin``
[B, S, W] with unit stride along W and any other strides (stride 0 along B when the
positions are shared by the batch); cos/sin in x's dtype or float32. Outputs are
contiguous [B, S, H, D]. Math is fp32 for fp16/bf16 (fp64 for float64 on the cpu
backend), each output rounded once.

Gradients for cos/sin: HF's cos/sin come from a no-grad rotary module. When they do
require grad, the call runs the torch path (differentiable in all inputs); the kernels'
autograd refuses rather than drops a cos/sin gradient if called directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, kernel, unit_last_stride


def _pairs(t: Tensor, R: int, interleaved: bool):
    """(first, second) elements of the pairs of t's first R features."""
    if interleaved:
        return t[..., 0:R:2], t[..., 1:R:2]
    return t[..., :R // 2], t[..., R // 2:R]


def reference(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, conj: bool = False) -> Tensor:
    """The rotation (``conj``: its transpose) in torch ops on the canonical form: x [B, S, H, D],
    cos/sin [B or 1, S, W]. Differentiable in every input; the torch backend and double backward."""
    R = rotary_dim
    dt = torch.promote_types(x.dtype, torch.float32)  # fp32 math for fp16/bf16, one rounding
    x1, x2 = _pairs(x.to(dt), R, interleaved)
    c, s = cos.to(dt)[:, :, None, :], sin.to(dt)[:, :, None, :]
    (c1, c2), (s1, s2) = ((c, c), (s, s)) if c.shape[-1] != R else (_pairs(c, R, interleaved),
                                                                     _pairs(s, R, interleaved))
    if conj:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    rot = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., R:]), dim=-1)


def _fake(q, k, cos, sin, rotary_dim, interleaved):
    return q.new_empty(q.shape), (q.new_empty((0,)) if k is None else k.new_empty(k.shape))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, rotary_dim, interleaved = inputs
    ctx.rope = (rotary_dim, interleaved, k is not None)
    ctx.like = [(t.shape, t.dtype) for t in (q, k) if t is not None]  # for a grad that comes back None
    ctx.save_for_backward(cos, sin)


def _backward(ctx, bwd, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    R, interleaved, has_k = ctx.rope
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("llmfast::rope_fwd does not differentiate cos/sin; llmfast.ops.rope.rope runs the torch "
                           "path when they require grad")
    grads = [torch.zeros(shape, dtype=dtype, device=cos.device) if g is None else g
             for g, (shape, dtype) in zip((grad_q, grad_k), ctx.like)]
    if create_graph():  # double backward ahead: the transpose in differentiable torch ops (it is linear in g)
        out = [reference(g, cos, sin, R, interleaved, conj=True) for g in grads]
        return out[0], (out[1] if has_k else None), None, None, None, None
    grads = [unit_last_stride(g) for g in grads]
    need_k = has_k and ctx.needs_input_grad[1]  # k's transpose is skipped when only q needs it
    dq, dk = bwd(grads[0], grads[1] if need_k else None, cos, sin, R, interleaved)
    return dq, (dk if need_k else None), None, None, None, None


# grad_q: [B, S, Hq, D], grad_k: None or [B, S, Hk, D] (unit stride along D); cos/sin as for
# rope_fwd. Returns the rotation's transpose applied to each (contiguous; [0] for a None grad_k).
rope_bwd = kernel("rope_bwd", "(Tensor grad_q, Tensor? grad_k, Tensor cos, Tensor sin, int rotary_dim, "
                  "bool interleaved) -> (Tensor, Tensor)", _fake, triton="rope:rope_bwd")
# q: [B, S, Hq, D], k: None or [B, S, Hk, D] of q's dtype, unit stride along D, any other strides;
# cos, sin: [B, S, W], W = rotary_dim (one value per feature) or rotary_dim / 2 (one per pair), unit
# stride along W, any other strides, q's dtype or float32; rotary_dim even, <= D. Returns the rotated
# q and k, contiguous (an empty [0] tensor when k is None).
rope_fwd = kernel("rope_fwd", "(Tensor q, Tensor? k, Tensor cos, Tensor sin, int rotary_dim, "
                  "bool interleaved) -> (Tensor, Tensor)", _fake, triton="rope:rope_fwd",
                  autograd=(rope_bwd, _setup_context, _backward))

backends.register_op(OpSpec("rope", kernel=rope_fwd))


def rope(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool):
    """(q rotated, k rotated or None) on the canonical form (module docstring).

    Arguments are assumed checked (``llmfast.nn.functional`` does that); cos/sin may be
    [1, S, W] (shared positions): they are broadcast over the batch as a stride-0 view.
    """
    which = backends.resolve("rope", q)
    if which == "torch" or cos.requires_grad or sin.requires_grad or q.numel() == 0:
        return (reference(q, cos, sin, rotary_dim, interleaved),
                None if k is None else reference(k, cos, sin, rotary_dim, interleaved))
    B, S = q.shape[:2]
    cos, sin = (unit_last_stride(t.expand(B, S, t.shape[-1])) for t in (cos, sin))
    k = None if k is None else unit_last_stride(k)
    qo, ko = rope_fwd.on(which, q.device.type)(unit_last_stride(q), k, cos, sin, rotary_dim, interleaved)
    return qo, (None if k is None else ko)


def _rows(t: Tensor, seq: Optional[Tensor], pos: Tensor) -> Tensor:
    """Rows ``pos`` of a table ``t`` [S_ro, W] or [N or 1, S_ro, W] (sequence ``seq``, broadcast with pos)."""
    if t.dim() == 2:
        return t[pos]
    return t[0][pos] if t.shape[0] == 1 else t[seq, pos]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inplace: bool,
                 seqlen_offsets, cu_seqlens: Optional[Tensor], total: int) -> Tensor:
    """flash-attn's ``apply_rotary_emb`` on checked arguments, as one :func:`rope` call.

    Each token's angles are brought to the canonical per-row tables [B, S, W]: a view of
    cos/sin for an int offset without ``cu_seqlens`` (no copy), else one gather
    (``[B, S]`` positions ``offsets[b] + s``; packed: token i of segment b at position
    ``i - cu_seqlens[b] + offsets[b]``). x [B, S, H, D], or packed [T, H, D] with
    ``total = cu_seqlens[-1]`` tokens to rotate (the rest pass through). Positions are
    assumed in range (checked by ``llmfast.nn.functional.rotary_embedding``).
    """
    R = 2 * cos.shape[-1]
    if cu_seqlens is None:
        rows = x                                                           # [B, S, H, D]
        B, S = x.shape[:2]
        if isinstance(seqlen_offsets, int):  # one window of the tables, shared by the batch
            c, s = (t[seqlen_offsets:seqlen_offsets + S].unsqueeze(0) if t.dim() == 2
                    else t[:, seqlen_offsets:seqlen_offsets + S] for t in (cos, sin))
        else:
            seq = torch.arange(B, device=x.device)[:, None]
            pos = seqlen_offsets.long()[:, None] + torch.arange(S, device=x.device)   # [B, S]
            c, s = (_rows(t, seq, pos) for t in (cos, sin))
    else:
        rows = x[:total].unsqueeze(0)                                      # [1, total, H, D], a view
        token = torch.arange(total, dtype=cu_seqlens.dtype, device=x.device)
        seq = torch.searchsorted(cu_seqlens, token, right=True) - 1        # each token's segment (never an empty one)
        pos = (token - cu_seqlens[seq]).long()
        pos = pos + (seqlen_offsets if isinstance(seqlen_offsets, int) else seqlen_offsets.long()[seq])
        c, s = (_rows(t, seq, pos).unsqueeze(0) for t in (cos, sin))
    angle_grad = c.requires_grad or s.requires_grad
    # In place: the torch path differentiating cos/sin saves x's rotated features, which the
    # copy below overwrites; rotate a copy then (the kernels save only cos and sin).
    src = rows.clone() if inplace and angle_grad else rows
    out = rope(src, None, c, s, R, interleaved)[0]
    if inplace:
        # copy_ bumps x's version counter and records the write for autograd, as torch's in-place ops do
        rows[..., :R].copy_(out[..., :R])
        return x
    if cu_seqlens is None:
        return out
    out = out[0]
    return torch.cat((out, x[total:])) if total < x.shape[0] else out

"""attention: kernel declarations, autograd, backend choice and the canonical form.

The kernels see a canonical problem: q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S,
Dv] with H % Hkv == 0 (GQA), last dims contiguous and any other strides (so packed
QKV views and broadcast batch dims cost no copy), an optional mask viewed as
[B, H, L, S] (bool, or float32 additive; strides 0 where it broadcasts), is_causal
(top-left), dropout_p and a seed. They return out [B, H, L, Dv] and lse [B, H, L]
(fp32). :func:`attention` brings a checked call to that form.

lse is returned without gradient (as in flash-attn): the backward formulas take only
grad_out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llmfast import backends, reference
from llmfast.backends import OpSpec
from llmfast.ops._library import create_graph, grads_by_recompute, kernel, unit_last_stride


def _fwd_fake(q, k, v, mask, scale, is_causal, dropout_p, seed, window_left=-1, window_right=-1, bottom_right=False,
              softcap=0.0, sinks=None):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, window_left=-1, window_right=-1,
              bottom_right=False, softcap=0.0, sinks=None):
    dsinks = q.new_empty((0,) if sinks is None else sinks.shape, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


# The options after `seed`, in schema order (window_left, window_right, bottom_right,
# softcap); `sinks` is a tensor and travels with the saved tensors.
_N_OPTS = 4


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, *opts, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, sinks)
    ctx.args = (scale, is_causal, dropout_p, seed, *opts)
    ctx.mark_non_differentiable(lse)


def _recompute_backward(ctx, grad_out, q, k, v, mask, sinks, scale, is_causal, dropout_p, seed, window_left,
                        window_right, bottom_right, softcap):
    """(dq, dk, dv, dsinks) with graph, for double backward: the reference (same dropout mask) differentiated."""
    def fn(q_, k_, v_, sinks_):
        return reference.attention(q_, k_, v_, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                   seed=seed, window=(window_left, window_right), bottom_right=bottom_right,
                                   softcap=softcap, sinks=sinks_)[0]
    needed = tuple(ctx.needs_input_grad[:3]) + (sinks is not None and ctx.needs_input_grad[-1],)
    return tuple(grads_by_recompute(fn, (q, k, v, sinks), needed, (grad_out,)))


def _backward(ctx, bwd, grad_out, grad_lse):
    q, k, v, out, lse, mask, sinks = ctx.saved_tensors
    if create_graph():
        dq, dk, dv, dsinks = _recompute_backward(ctx, grad_out, q, k, v, mask, sinks, *ctx.args)
    else:
        dq, dk, dv, dsinks = bwd(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, mask, *ctx.args, sinks)
    return (dq, dk, dv) + (None,) * (5 + _N_OPTS) + (dsinks if sinks is not None else None,)


# The options beyond torch's SDPA (FlashAttention 2's, and gpt-oss's sinks), in one op
# so that every backend sees one problem: with off = S - L when bottom_right (FA2's
# alignment: the last query row sees the last key) and off = 0 otherwise (torch's
# top-left), key j is visible to query i iff
#     (not is_causal or j <= i + off) and i + off - window_left <= j <= i + off + window_right
# (a window bound of -1 is unbounded), and the mask allows it. softcap c > 0 turns the
# scaled score s into c*tanh(s/c) before the mask is added. sinks: None or [H] fp32 logits,
# one per query head, that join each row's softmax denominator (gpt-oss); the backward
# returns their gradient as a 4th output ([H] fp32; [0] without sinks). The defaults
# (-1, -1, False, 0.0, None) are plain attention, and the backends whose kernels lack an
# option never get a call that uses it: OpSpec.features routes such calls (see `_needs`).
_OPTS_SCHEMA = "int window_left=-1, int window_right=-1, bool bottom_right=False, float softcap=0.0, Tensor? sinks=None"

# Returns (dq, dk, dv, dsinks): dq, dk, dv shaped like q, k, v (dk/dv summed over each
# GQA group); dsinks [H] fp32 (a [0] tensor without sinks).
attention_bwd = kernel(
    "attention_bwd", "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
    f"float scale, bool is_causal, float dropout_p, int seed, {_OPTS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
    _bwd_fake, triton="attention:attention_bwd")
# softmax(q k^T * scale + mask) v, tile by tile with an online softmax. q: [B, H, L, D],
# k: [B, Hkv, S, D], v: [B, Hkv, S, Dv]; H % Hkv == 0 (GQA: query head h reads kv head
# h / (H / Hkv)). Last dims contiguous, other strides free. mask: None, or bool (True =
# attend) / float32 (additive) viewed as [B, H, L, S] with any strides. is_causal keeps
# key j <= query i (top-left, torch.tril; bottom-right with bottom_right), the window and
# softcap and sinks options as above. dropout_p > 0 drops probabilities with a
# counter-based RNG keyed by `seed`, so backward regenerates the same mask. The draw is
# the same on every backend: element (b, h, i, j) is kept iff word 0 of Philox4x32-10
# with counter (j, i, b*H + h, 0) and key (seed & 0xffffffff, seed >> 32) is >=
# floor(dropout_p * 2^32) (uint32 compare), and kept probabilities are scaled by
# 1 / (1 - dropout_p); lse is that of the undropped softmax (reference.dropout_keep is
# the executable spec). Callers handle dropout_p >= 1. Returns out [B, H, L, Dv]
# (contiguous, input dtype) and lse [B, H, L] (float32; -inf for a row with no visible
# key, whose out is zeros and whose gradients are zero; with sinks, lse includes the sink).
attention_fwd = kernel(
    "attention_fwd", "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, float dropout_p, "
    f"int seed, {_OPTS_SCHEMA}) -> (Tensor, Tensor)", _fwd_fake, triton="attention:attention_fwd",
    autograd=(attention_bwd, _setup_context, _backward))

# Varlen (flash_attn_varlen_func), CPU kernels only: packed q [Tq, H, D], k [Tk, Hkv, D],
# v [Tk, Hkv, Dv] (last dims contiguous) and int32 cu_seqlens_q / cu_seqlens_k [n + 1]
# (from 0, non-decreasing, within Tq / Tk), checked on the host. Segment s is
# q[cu_q[s]:cu_q[s+1]] against k/v[cu_k[s]:cu_k[s+1]] with FlashAttention 2's
# bottom-right causal and window inside the segment, softcap and sinks as attention_fwd;
# no mask, no dropout (those calls run one attention_fwd per segment: llmfast.flash_attn).
# One call runs every segment, in parallel over (head, query tile) tasks, O(Σ len²) work.
# Returns out [Tq, H, Dv] (contiguous, input dtype) and lse [H, Tq] fp32 (-inf for a
# row that sees no key, and for rows past cu_q[-1], whose out is zeros).
_VARLEN_ARGS = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale, bool is_causal, int window_left, "
                "int window_right, float softcap, Tensor? sinks")


def _varlen_fwd_fake(q, k, v, cu_q, cu_k, scale, is_causal, window_left, window_right, softcap, sinks):
    T, H, _ = q.shape
    return q.new_empty((T, H, v.shape[-1])), q.new_empty((H, T), dtype=torch.float32)


def _varlen_bwd_fake(grad_out, q, k, v, out, lse, cu_q, cu_k, scale, is_causal, window_left, window_right, softcap,
                     sinks):
    return _bwd_fake(grad_out, q, k, v, out, lse, None, scale, is_causal, 0.0, 0, sinks=sinks)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.args = tuple(args)   # scale, is_causal, window_left, window_right, softcap
    ctx.mark_non_differentiable(lse)


def varlen_reference(q, k, v, cu_q, cu_k, scale, is_causal, window_left, window_right, softcap, sinks):
    """out [Tq, H, Dv] of the varlen kernels' problem, one reference call per segment (differentiable)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(bq) - 1):
        qs, ks, vs = (t[lo:hi].transpose(0, 1)[None] for t, lo, hi in
                      ((q, bq[b], bq[b + 1]), (k, bk[b], bk[b + 1]), (v, bk[b], bk[b + 1])))
        outs.append(reference.attention(qs, ks, vs, scale=scale, is_causal=is_causal,
                                        window=(window_left, window_right), bottom_right=True, softcap=softcap,
                                        sinks=sinks)[0][0].transpose(0, 1))
    outs.append(q.new_zeros((q.shape[0] - bq[-1], q.shape[1], v.shape[-1])))  # rows past cu_q[-1]
    return torch.cat(outs, 0)


def _varlen_backward(ctx, bwd, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    if create_graph():
        def fn(q_, k_, v_, sinks_):
            return varlen_reference(q_, k_, v_, cu_q, cu_k, *ctx.args, sinks_)
        needed = tuple(ctx.needs_input_grad[:3]) + (sinks is not None and ctx.needs_input_grad[-1],)
        dq, dk, dv, dsinks = grads_by_recompute(fn, (q, k, v, sinks), needed, (grad_out,))
    else:
        dq, dk, dv, dsinks = bwd(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args,
                                 sinks)
    return (dq, dk, dv) + (None,) * 7 + (dsinks if sinks is not None else None,)


attention_varlen_bwd = kernel(
    "attention_varlen_bwd", f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VARLEN_ARGS}) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _varlen_bwd_fake)
attention_varlen_fwd = kernel(
    "attention_varlen_fwd", f"(Tensor q, Tensor k, Tensor v, {_VARLEN_ARGS}) -> (Tensor, Tensor)", _varlen_fwd_fake,
    autograd=(attention_varlen_bwd, _varlen_setup_context, _varlen_backward))

# The optional features and which kernels implement them; the rest go to the reference.
FEATURES = frozenset({"window", "bottom_right", "softcap", "sinks"})

backends.register_op(OpSpec(
    "attention", kernel=attention_fwd, cpu_dtypes=None,
    features={"triton": FEATURES, "cuda": FEATURES, "cpu": FEATURES},
    notes={
        "cpu": "fp16/bf16 computed in fp32; dropout fused (Philox, same mask as triton); sliding window and "
               "bottom-right causal (blocks outside the band skipped), softcap and sinks fused; "
               "float64 and masks that need a gradient run on torch; flash_attn_varlen_func runs all segments "
               "in one call (attention_varlen_fwd; with ALiBi or dropout, one call per segment)",
        "triton": "dropout fused (Philox); sliding window and bottom-right causal (loops bounded to the band), "
                  "softcap and sinks fused; bf16 dots upcast to fp32 under TRITON_INTERPRET",
        "cuda": "dropout fused (Philox); sliding window and bottom-right causal (loops bounded to the band, "
                "per-element masks only on the band's edge tiles), softcap and sinks fused (dsinks: a "
                "deterministic per-head reduction kernel)",
        "torch": "reference: materialises the L x S scores; llmfast.flash_attn's ALiBi is a dense additive mask "
                 "and flash_attn_varlen_func runs one call per segment (after a host sync) on every backend but cpu",
    }))


# Dropout with a seed drawn inside the call (scaled_dot_product_attention, the module's
# training mode): the seed travels as an int64 scalar tensor, read with .item() only
# inside these ops, so torch.compile(fullgraph=True) traces the draw (torch.randint)
# instead of guarding on a data-dependent Python int, and every call gets a fresh mask.
# The kernels are the same; ``backend`` picks them.


@torch.library.custom_op("llmfast::attention_fwd_seeded", mutates_args=())
def attention_fwd_seeded(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                         dropout_p: float, seed: Tensor, backend: str, window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return attention_fwd.on(backend, q.device.type)(q, k, v, mask, scale, is_causal, dropout_p, int(seed.item()),
                                                    window_left, window_right, bottom_right, softcap, sinks)


@torch.library.custom_op("llmfast::attention_bwd_seeded", mutates_args=())
def attention_bwd_seeded(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float, seed: Tensor,
                         backend: str, window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
                         softcap: float = 0.0, sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return attention_bwd.on(backend, q.device.type)(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p,
                                                    int(seed.item()), window_left, window_right, bottom_right,
                                                    softcap, sinks)


@attention_fwd_seeded.register_fake
def _(q, k, v, mask, scale, is_causal, dropout_p, seed, backend, *opts):
    return _fwd_fake(q, k, v, mask, scale, is_causal, dropout_p, 0, *opts)


@attention_bwd_seeded.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed, backend, *opts):
    return _bwd_fake(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, 0, *opts)


def _seeded_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, backend, *opts, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed, sinks)
    ctx.args = (scale, is_causal, dropout_p)
    ctx.opts = tuple(opts)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _seeded_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, seed, sinks = ctx.saved_tensors
    if create_graph():
        dq, dk, dv, dsinks = _recompute_backward(ctx, grad_out, q, k, v, mask, sinks, *ctx.args, seed, *ctx.opts)
    else:
        dq, dk, dv, dsinks = attention_bwd_seeded(grad_out.to(out.dtype).contiguous(), q, k, v, out, lse, mask,
                                                  *ctx.args, seed, ctx.backend, *ctx.opts, sinks)
    return (dq, dk, dv) + (None,) * (6 + _N_OPTS) + (dsinks if sinks is not None else None,)


attention_fwd_seeded.register_autograd(_seeded_backward, setup_context=_seeded_setup_context)


# ----------------------------------------------------------------------------------
# Canonical form


def draw_seed() -> Tensor:
    """A dropout seed (int64 scalar tensor) from torch's default CPU generator, so
    ``torch.manual_seed`` fixes it; traceable by torch.compile."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _canonical_band(L: int, S: int, is_causal: bool, window, bottom_right: bool):
    """(is_causal, window_left, window_right, bottom_right) with what changes nothing dropped.

    A window bound that reaches past every key is unbounded; a right bound >= 0 under
    causal adds nothing; (left, 0) without causal is causal with a left bound; the
    alignment matters only for a band with L != S. So calls that are plain or causal
    attention in disguise reach every backend's kernels.
    """
    left, right = (int(w) for w in window)
    off = S - L if bottom_right else 0
    if left >= 0 and L - 1 + off - left <= 0:  # even the last row's lower bound is <= key 0
        left = -1
    if right == 0 and not is_causal:
        is_causal, right = True, -1
    if right >= 0 and (is_causal or off + right >= S - 1):  # the bound is past the causal edge / every key
        right = -1
    if (not is_causal and left < 0 and right < 0) or L == S:
        bottom_right = False
    return bool(is_causal), left, right, bool(bottom_right)


def _needs(is_causal, left, right, bottom_right, softcap, sinks) -> frozenset:
    """The optional features (OpSpec.features) a canonical call uses."""
    need = set()
    if left >= 0 or right >= 0:
        need.add("window")
    if bottom_right:
        need.add("bottom_right")
    if softcap:
        need.add("softcap")
    if sinks is not None:
        need.add("sinks")
    return frozenset(need)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
              is_causal: bool = False, dropout_p: float = 0.0, seed: Optional[int] = None, window=(-1, -1),
              bottom_right: bool = False, softcap: float = 0.0, sinks: Optional[Tensor] = None):
    """Fused attention on canonical shapes; returns ``(out [B, H, L, Dv], lse [B, H, L] fp32)``.

    Arguments are assumed checked (``llmfast.nn.functional`` and ``llmfast.flash_attn``
    do that): q [B, H, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] of one float dtype with
    H % Hkv == 0; ``mask`` broadcastable to [B, H, L, S], bool (True = attend) or
    additive float; ``window = (left, right)`` (each >= -1), ``bottom_right``, ``softcap``
    (>= 0) and ``sinks`` ([H], any float dtype, computed in fp32) as in
    :func:`llmfast.reference.attention`. A backend whose kernels lack an option this
    call uses is passed over for the next one (or the torch reference).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    softcap = float(softcap)
    B, H, L, _ = q.shape
    S = k.shape[2]
    is_causal, left, right, bottom_right = _canonical_band(L, S, is_causal, window, bottom_right)
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    which = backends.resolve("attention", q, _needs(is_causal, left, right, bottom_right, softcap, sinks))
    if which != "torch" and mask is not None and mask.requires_grad:
        which = "torch"  # the kernels give no gradient for an additive mask; autograd through the reference does
    seed = 0 if seed is None else seed  # an int, or a tensor from draw_seed()
    if which == "torch" or dropout_p >= 1:
        return reference.attention(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                                   seed=seed, window=(left, right), bottom_right=bottom_right, softcap=softcap,
                                   sinks=sinks)
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = mask.to(torch.float32)  # kernels read additive masks as fp32
        mask = mask.expand(B, H, L, S)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()  # the kernels read fp32 logits (the cast is differentiable)
    opts = (left, right, bottom_right, softcap, sinks)
    if isinstance(seed, Tensor):
        return attention_fwd_seeded(q, k, v, mask, scale, is_causal, dropout_p, seed, which, *opts)
    return attention_fwd.on(which, q.device.type)(q, k, v, mask, scale, is_causal, dropout_p, int(seed), *opts)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                     scale: Optional[float] = None, is_causal: bool = False, window=(-1, -1), softcap: float = 0.0,
                     sinks: Optional[Tensor] = None):
    """``(out [Tq, H, Dv], lse [H, Tq] fp32)`` of packed segments in one kernel call, or None.

    Arguments are assumed checked (``llmfast.flash_attn.flash_attn_varlen_func`` does that;
    semantics in the comment above ``attention_varlen_fwd``). None when the backend this call
    resolves to has no varlen kernel (only ``cpu`` has one): the caller then runs one
    :func:`attention` per segment.
    """
    left, right = (int(w) for w in window)
    softcap = float(softcap)
    needs = _needs(bool(is_causal), left, right, True, softcap, sinks)
    if backends.resolve("attention", q, needs) != "cpu" or q.device.type != "cpu":
        return None
    if not backends._has_kernel("llmfast::attention_varlen_fwd", "CPU"):
        return None  # an llmfast._C built before the varlen kernels: per segment
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
    return attention_varlen_fwd.on("cpu", "cpu")(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, bool(is_causal), left,
                                                 right, softcap, sinks)

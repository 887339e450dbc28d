"""The ``torch`` backend: every op written with plain PyTorch ops.

These functions define llmfast's semantics. Tests run them in float64 as the
reference, and in the input's dtype as "PyTorch's own error" for the
FlashAttention tolerance rule; ``llmfast bench`` reports errors against them.
"""
from __future__ import annotations

import torch


def causal_keep(L: int, S: int, device) -> torch.Tensor:
    """[L, S] bool, True where column j <= row i (``torch.tril``, top-left aligned)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def softmax(x, dim=-1, *, scale=None, mask=None, is_causal=False, log=False):
    """softmax/log_softmax of ``x * scale`` with a bool/additive ``mask`` and causal mask.

    Positions a mask removes get probability 0 (log-prob -inf) and zero gradient; a
    row with no visible position gives zeros (and zero gradient), never NaN. With no
    mask this is exactly ``torch.softmax``.
    """
    z = x if scale is None else x * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if is_causal:
        z = z.masked_fill(~causal_keep(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    if mask is not None or is_causal:
        dead = torch.isneginf(z)
        empty = dead.all(dim, keepdim=True)
        # A row with nothing visible is softmaxed as zeros and then overwritten: its -inf
        # logits would give NaN, and through an additive mask a NaN gradient, not zero.
        z = z.masked_fill(empty, 0.0)
    out = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    if mask is not None or is_causal:
        if log:  # the constant branch of masked_fill carries no gradient
            out = out.masked_fill(dead, float("-inf"))
        out = out.masked_fill(empty, 0.0)
    return out


def softmax_backward(grad, out, scale=1.0, log=False, masked=False):
    """The input gradient of (log-)softmax over the last dim, from its output: the
    kernels' formula (used for double backward, as it is differentiable).

    softmax: ``scale * y * (g - sum(g * y))``; log_softmax: ``scale * (g - exp(y) *
    sum(g))``. With a mask, a masked position (log-prob -inf) and a fully masked row
    (written as zeros: exp sums to N > 1 there) get zero gradient.
    """
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    g, y = grad.to(acc), out.to(acc)
    if log:
        p = y.exp()
        if masked:  # a masked position's -inf is a constant: its incoming gradient counts for nothing
            g = g.masked_fill(torch.isneginf(y), 0.0)
        gx = g - p * g.sum(-1, keepdim=True)
        if masked:
            dead = (p.sum(-1, keepdim=True) > 1.5) if y.shape[-1] > 1 else torch.zeros_like(y, dtype=torch.bool)
            gx = gx.masked_fill(torch.isneginf(y) | dead, 0.0)
    else:
        gx = y * (g - (g * y).sum(-1, keepdim=True))
    return (gx * scale).to(out.dtype)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """``torch.nn.functional.layer_norm``; with ``residual``, of ``s = x + residual``
    (in x's dtype), returning ``(out, s)``."""
    s = x if residual is None else x + residual
    out = torch.nn.functional.layer_norm(s, list(normalized_shape), weight, bias, eps)
    return out if residual is None else (out, s)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None):
    """``torch.nn.functional.rms_norm``; with ``residual``, of ``s = x + residual``
    (in x's dtype), returning ``(out, s)``. ``eps=None`` is torch's default (the math dtype's epsilon)."""
    s = x if residual is None else x + residual
    out = torch.nn.functional.rms_norm(s, list(normalized_shape), weight, eps)
    return out if residual is None else (out, s)


def norm_backward(grad, s, weight, eps, centered):
    """(ds, dweight) of layer_norm (centered) / rms_norm of rows ``s`` [M, N] from
    the statistics recomputed in differentiable torch ops (used for double backward:
    ``s`` may be an output of the fused op, e.g. ``x + residual``, so this is a
    formula rather than autograd through a recomputed forward)."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    g, x = grad.to(acc), s.to(acc)
    if centered:
        x = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x * rstd
    gw = g if weight is None else g * weight.to(acc)
    inner = gw - gw.mean(-1, keepdim=True) if centered else gw
    ds = rstd * (inner - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw = None if weight is None else (g * xhat).sum(0)
    return ds.to(s.dtype), dw


# ----------------------------------------------------------------------------------
# Attention

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m * x for uint32 values held in int64 tensors.

    The 64-bit product overflows int64, so x is split in 16-bit halves: every
    partial product stays below 2^49.
    """
    xh, xl = x >> 16, x & 0xFFFF
    ph, pl = m * xh, m * xl
    lo = (((ph & 0xFFFF) << 16) + pl) & _U32
    hi = (ph + (pl >> 16)) >> 16
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 counters; returns the 4 output words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Drop an element iff its uint32 draw is below floor(p * 2^32) (p < 1)."""
    return min(int(p * 4294967296.0), _U32)


def dropout_keep(seed, p: float, B: int, H: int, L: int, S: int, device) -> torch.Tensor:
    """[B, H, L, S] bool keep-mask of attention dropout, identical on every backend.

    Element (b, h, i, j) draws word 0 of Philox4x32-10 with counter
    (j, i, b*H + h, 0) and key (seed & 0xffffffff, seed >> 32 & 0xffffffff), and is
    kept iff that uint32 is >= floor(p * 2^32). A counter-based RNG lets the
    backward pass regenerate the forward's mask from (seed, index) alone. ``seed`` is an
    int or an int64 scalar tensor (traceable by torch.compile without ``.item()``).
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    j = torch.arange(S, device=device, dtype=torch.int64).view(1, 1, 1, S)
    i = torch.arange(L, device=device, dtype=torch.int64).view(1, 1, L, 1)
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    shape = (B, H, L, S)
    c0, c1, c2 = j.expand(shape), i.expand(shape), bh.expand(shape)
    c3 = torch.zeros((), device=device, dtype=torch.int64).expand(shape)
    r, _, _, _ = philox4x32(c0, c1, c2, c3, seed & _U32, (seed >> 32) & _U32)
    return r >= dropout_threshold(p)


def band_keep(L: int, S: int, device, *, is_causal=False, window=(-1, -1), bottom_right=False):
    """[L, S] bool: key j visible to query i under causal / sliding-window banding.

    With ``off = S - L`` when ``bottom_right`` (FlashAttention 2's alignment: the last
    query sees the last key) and 0 otherwise (torch's top-left ``tril``), key j is
    visible iff ``i + off - left <= j <= i + off + right`` (``window = (left, right)``,
    inclusive, -1 = unbounded on that side) and, when ``is_causal``, ``j <= i + off``.
    """
    left, right = window
    off = S - L if bottom_right else 0
    i = torch.arange(L, device=device).view(L, 1) + off
    j = torch.arange(S, device=device).view(1, S)
    keep = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def attention(q, k, v, mask=None, *, scale=None, is_causal=False, dropout_p=0.0, seed=0, window=(-1, -1),
              bottom_right=False, softcap=0.0, sinks=None):
    """softmax(q kᵀ·scale + mask) v, and the log-sum-exp of each row.

    q: [B, H, L, D], k: [B, Hkv, S, D], v: [B, Hkv, S, Dv] with H % Hkv == 0 (query
    head h reads key/value head h // (H // Hkv)). ``mask`` broadcasts to [B, H, L, S]:
    bool (True = attend) or additive float. ``is_causal`` keeps key j <= query i
    (top-left, ``torch.tril``; bottom-right, FlashAttention 2's, when ``bottom_right``),
    ``window = (left, right)`` keeps the band of :func:`band_keep`. ``softcap`` c > 0
    replaces the scaled scores s by ``c·tanh(s/c)`` (Gemma 2; tanh saturates, so nothing
    overflows) before the mask is added. ``sinks`` [H] (float, one logit per query head,
    gpt-oss) join every row's softmax denominator as an extra column that is then dropped:
    p_ij = exp(z_ij - lse_i) with lse_i = log(Σ_j exp(z_ij) + exp(sink_h)). A row that sees
    no key gives zeros (zero gradient) and lse -inf (lse = sink with sinks). ``dropout_p``
    drops probabilities with :func:`dropout_keep` (scaled by 1/(1 - p)); lse is that of
    the undropped softmax.

    Returns ``(out [B, H, L, Dv] in q's dtype, lse [B, H, L] float32)``.
    """
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q.dtype in (torch.float16, torch.bfloat16):
        # Scores, softmax and accumulation in fp32, as torch's own CPU/GPU kernels do: in
        # bf16 the rounded scores and probabilities cost ~10x torch's error at |q.k| ~ 100.
        out, lse = attention(q.float(), k.float(), v.float(), mask, scale=scale, is_causal=is_causal,
                             dropout_p=dropout_p, seed=seed, window=window, bottom_right=bottom_right,
                             softcap=softcap, sinks=None if sinks is None else sinks.float())
        return out.to(q.dtype), lse
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = D ** -0.5 if scale is None else scale
    z = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    banded = is_causal or tuple(window) != (-1, -1)
    if banded:
        z = z.masked_fill(~band_keep(L, S, z.device, is_causal=is_causal, window=tuple(window),
                                     bottom_right=bottom_right), float("-inf"))
    if sinks is not None:
        # the sink column: exp(sink) joins the denominator, its probability is dropped
        zs = torch.cat([z, sinks.to(z.dtype).view(1, H, 1, 1).expand(B, H, L, 1)], -1)
        lse = torch.logsumexp(zs, -1)
        p = torch.softmax(zs, -1)[..., :S]
    else:
        lse = torch.logsumexp(z, -1) if S > 0 else z.new_full((B, H, L), float("-inf"))
        if S > 0 and (mask is not None or banded):
            # no visible key: zeros and zero gradient, not NaN (softmax of the -inf row is
            # NaN, and through an additive mask so would be the gradient: replace it first)
            dead = torch.isneginf(lse).unsqueeze(-1)
            p = torch.softmax(z.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
        else:
            p = torch.softmax(z, -1)
    if dropout_p > 0:
        if dropout_p >= 1:
            p = p * 0.0
        else:
            keep = dropout_keep(seed, dropout_p, B, H, L, S, q.device)
            p = p.masked_fill(~keep, 0.0) * (1.0 / (1.0 - dropout_p))
    out = p @ v
    return out, lse.detach().float()


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """:func:`torch.nn.functional.cross_entropy`: llmfast's semantics are torch's.

    ``weight`` may be of any float dtype (it is cast to the input's, which torch requires);
    ``target`` may be uint8 class indices for any input rank (the kernels take them).
    """
    if weight is not None:
        weight = weight.to(input.dtype)
    if target.dtype == torch.uint8:  # class indices; torch's nll_loss2d takes int64 only
        target = target.long()
    return torch.nn.functional.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                                             reduction=reduction, label_smoothing=label_smoothing)


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, class_weight=None, softcap=0.0):
    """``cross_entropy(hidden @ weight.T + bias, target)`` with the vocabulary last.

    hidden: [..., H]; weight: [V, H]; bias: [V]; target: [...]; softcap c > 0 takes the
    loss of ``c * tanh(logits / c)`` (Gemma 2's final-logit soft-capping). The logits
    [..., V] exist in full here: this is the unfused definition.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), class_weight, ignore_index,
                         reduction, label_smoothing)
    return loss.reshape(target.shape) if reduction == "none" else loss

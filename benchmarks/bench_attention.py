"""Fused attention: cases, providers, FLOPs.

FLOPs (the standard count): forward ``4·B·H·L·S·D`` (two GEMMs of 2·L·S·D per head),
halved for causal; backward 2.5× forward, so forward+backward is 3.5× forward.

Providers: ``torch`` is ``torch.nn.functional.scaled_dot_product_attention`` (torch's
own fused kernels), ``eager`` is ``softmax(q@kᵀ·scale)@v`` as users write it (it
materialises the [B, H, L, S] scores; ``llmfast bench --vs eager`` compares with it),
``torch_compile`` is that expression under ``torch.compile``, and
``llmfast:<backend>`` runs ``llmfast.nn.functional.scaled_dot_product_attention``.
Peak memory is measured for every provider (``MEMORY``): the fused kernels need O(L)
extra memory, the eager expression O(L·S).

Variant cases (issue 12; CPU, and on a GPU for the cuda and triton kernels): a causal sliding window of W keys (``window W``: key j
visible to query i iff i - W < j <= i) and ``softcap c``. Their FLOPs count the visible
pairs only (Σ_i min(i + 1, W) for the window). There ``torch`` is SDPA given the dense
equivalent bool mask (window) or the unfused reference in the input dtype (softcap: SDPA
has none), and ``llmfast:<backend>`` calls the fused op with the option; the ratios the
issue asks for compare these cases with the plain causal case of the same shape, e.g.
``llmfast bench --op attention --case "H4 L8192" --rounds 5``. Their float64 reference is
skipped above 4096 keys (the error column reads nan; tests/test_attention_variants.py
checks the kernels).

Varlen cases (issue 12, ``varlen`` in the name): a packed batch of B segments whose
lengths are drawn with a fixed seed between 1 and Smax (seed 0 at B = 8, Smax = 2048:
8832 of 16384 padded tokens, so the padded batch is 46% padding). ``llmfast:<backend>``
runs ``llmfast.flash_attn.flash_attn_varlen_func`` on the packed ``[total, H, D]``
tensors; ``torch`` is SDPA on the padded ``[B, H, Smax, D]`` batch given the equivalent
bool mask (key padding, and causal: SDPA takes one or the other, not both), which is
what a padded batch costs. Its padding query rows are left out of the error column
(their gradient too; the cotangent there is zero), which compares the real tokens, packed,
with the float64 reference; that gather is timed with the padded provider (a copy of
O(total·H·D), ~1% of it). FLOPs count the real pairs only (Σ len², or Σ len·(len + 1)/2
causal), so the throughput column is the useful work of every provider. No ``eager``
provider: its [B, H, Smax, Smax] scores would take GiBs. The issue's target is the ratio
in one run: ``llmfast bench --op attention --case varlen --rounds 5``. Measured so (2 shared
cores, load ~4-5, cpu backend with one kernel call for all segments), llmfast vs padded SDPA,
fp32 / bf16: fwd 2.25x / 1.06x, fwd causal 4.23x / 1.91x, fwd+bwd 3.07x / 1.87x, fwd+bwd
causal 6.90x / 3.29x. bf16 falls short without causal: SDPA runs bf16 dot products there
(~2.5x its fp32 speed per CPU second) while these kernels compute in fp32.
"""
import itertools

import torch
import torch.nn.functional as tF

from llmfast import backends
from llmfast import reference as _ref
from llmfast.nn import functional as LF
from llmfast.ops import attention as attention_op

OP = "attention"
MEMORY = True  # llmfast bench measures peak memory of every provider for this op

# (B, H, Hkv, L, S, D, causal, mode)
_CPU_FULL = [
    (1, 8, 8, 2048, 2048, 64, False, "fwd"),
    (1, 8, 8, 2048, 2048, 64, True, "fwd"),
    (1, 8, 8, 2048, 2048, 64, False, "fwd+bwd"),
    (1, 8, 8, 2048, 2048, 64, True, "fwd+bwd"),
    (2, 8, 2, 1024, 1024, 128, True, "fwd"),
]
_GPU_FULL = [
    (4, 16, 16, 4096, 4096, 64, False, "fwd"),
    (4, 16, 16, 4096, 4096, 64, True, "fwd"),
    (4, 16, 16, 4096, 4096, 128, True, "fwd"),
    (4, 32, 8, 2048, 2048, 128, True, "fwd"),
    (4, 16, 16, 4096, 4096, 64, True, "fwd+bwd"),
    (4, 16, 16, 4096, 4096, 128, True, "fwd+bwd"),
]
# (B, H, L, D, mode, window, softcap): causal, Hkv = H, S = L
_CPU_VARIANTS = [
    (1, 4, 8192, 64, "fwd", 512, 0.0),
    (1, 4, 8192, 64, "fwd", -1, 0.0),
    (1, 4, 8192, 64, "fwd+bwd", 512, 0.0),
    (1, 4, 8192, 64, "fwd+bwd", -1, 0.0),
    (1, 4, 2048, 64, "fwd+bwd", -1, 30.0),
    (1, 4, 2048, 64, "fwd+bwd", -1, 0.0),
]
# the same on a GPU: the window's cost against plain causal's (both kernels bound their loops to
# the band), and softcap's against none
_GPU_VARIANTS = [
    (4, 16, 8192, 128, "fwd", 1024, 0.0),
    (4, 16, 8192, 128, "fwd", -1, 0.0),
    (4, 16, 8192, 128, "fwd+bwd", 1024, 0.0),
    (4, 16, 8192, 128, "fwd+bwd", -1, 0.0),
    (4, 16, 4096, 128, "fwd+bwd", -1, 50.0),
    (4, 16, 4096, 128, "fwd+bwd", -1, 0.0),
]
_QUICK = [
    (1, 4, 4, 512, 512, 64, False, "fwd"),
    (1, 4, 4, 512, 512, 64, True, "fwd+bwd"),
]
# (B, H, Smax, D, causal, mode): packed segments of lengths drawn in [1, Smax] (seed 0)
_CPU_VARLEN = [
    (8, 16, 2048, 64, False, "fwd"),
    (8, 16, 2048, 64, True, "fwd"),
    (8, 16, 2048, 64, False, "fwd+bwd"),
    (8, 16, 2048, 64, True, "fwd+bwd"),
]
_QUICK_VARLEN = [(4, 4, 256, 64, True, "fwd+bwd")]


def _varlen_lengths(B, Smax):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, Smax + 1, (B,), generator=g).tolist()


def cases(quick, device, dtypes):
    table = _QUICK if quick else (_GPU_FULL if torch.device(device).type == "cuda" else _CPU_FULL)
    out = []
    for B, H, Hkv, L, S, D, causal, mode in table:
        for dt in dtypes:
            gqa = f" gqa {H}:{Hkv}" if Hkv != H else ""
            name = f"{mode} B{B} H{H} L{L} S{S} D{D}{' causal' if causal else ''}{gqa}"
            out.append(dict(name=name, B=B, H=H, Hkv=Hkv, L=L, S=S, D=D, causal=causal, mode=mode, dtype=dt))
    if not quick:
        for B, H, L, D, mode, window, softcap in (_GPU_VARIANTS if torch.device(device).type == "cuda"
                                                  else _CPU_VARIANTS):
            for dt in dtypes:
                name = (f"{mode} B{B} H{H} L{L} S{L} D{D} causal" + (f" window {window}" if window > 0 else "")
                        + (f" softcap {softcap:g}" if softcap else "") + " (variants)")
                out.append(dict(name=name, B=B, H=H, Hkv=H, L=L, S=L, D=D, causal=True, mode=mode, dtype=dt,
                                window=window, softcap=softcap, variant=True))
    if quick or torch.device(device).type == "cpu":
        for B, H, Smax, D, causal, mode in _QUICK_VARLEN if quick else _CPU_VARLEN:
            lengths = _varlen_lengths(B, Smax)
            for dt in dtypes:
                name = (f"{mode} varlen B{B} H{H} Smax{Smax} D{D}{' causal' if causal else ''} "
                        f"tokens {sum(lengths)}/{B * Smax}")
                out.append(dict(name=name, B=B, H=H, Hkv=H, Smax=Smax, D=D, causal=causal, mode=mode, dtype=dt,
                                lengths=lengths, varlen=True))
    return out


def providers(case, device):
    return [] if case.get("variant") or case.get("varlen") else ["eager", "torch_compile"]


def work(case):
    W = case.get("window", -1)
    if case.get("varlen"):  # the real (query, key) pairs of every segment
        pairs = sum(n * (n + 1) // 2 if case["causal"] else n * n for n in case["lengths"])
        flops = 4 * case["H"] * pairs * case["D"]
    elif W > 0:  # visible (query, key) pairs of the causal window: Σ_i min(i + 1, W)
        L = case["L"]
        pairs = W * (W + 1) // 2 + max(L - W, 0) * W if L >= W else L * (L + 1) // 2
        flops = 4 * case["B"] * case["H"] * pairs * case["D"]
    else:
        flops = 4 * case["B"] * case["H"] * case["L"] * case["S"] * case["D"]
        if case["causal"]:
            flops //= 2
    if case["mode"] == "fwd+bwd":
        flops = flops * 7 // 2  # forward + 2.5x forward
    return "TFLOP/s", flops


def _inputs(case, device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]
    B, H, Hkv, L, S, D = (case[k] for k in ("B", "H", "Hkv", "L", "S", "D"))
    q = torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dt)
    k = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dt)
    v = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dt)
    dout = torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dt)
    return q, k, v, dout


def _eager_math(q, k, v, causal):
    """softmax(q kᵀ·scale) v as users write it; the [B, H, L, S] scores exist."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def _wrap(fn, case, device, dtype=None, inputs=None, pick=lambda x: x):
    """The timed callable: fn(q, k, v), or its backward too; it returns pick(out or q.grad).

    inputs: (q, k, v, dout), default :func:`_inputs`; pick: the rows to check (varlen's padded batch)."""
    q, k, v, dout = _inputs(case, device, dtype) if inputs is None else inputs
    if case["mode"] == "fwd":
        def fwd():
            with torch.no_grad():
                return pick(fn(q, k, v))
        return fwd
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
        return pick(q.grad)
    return step


def _variant_keep(case, device):
    """[L, S] bool: the causal window as a dense mask (what SDPA needs to be told)."""
    return _ref.band_keep(case["L"], case["S"], device, is_causal=True, window=(case["window"] - 1, -1))


def _setup_variant(provider, case, device):
    W, cap = case["window"], case["softcap"]
    window = (W - 1, -1) if W > 0 else (-1, -1)
    if provider == "torch":
        if cap:  # SDPA has no soft-cap: the unfused reference in the input dtype
            return _wrap(lambda q, k, v: _ref.attention(q, k, v, is_causal=True, softcap=cap)[0], case, device)
        mask = _variant_keep(case, device) if W > 0 else None
        return _wrap(lambda q, k, v: tF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None),
                     case, device)
    backend = provider.split(":", 1)[1]

    def fn(q, k, v):
        with backends.backend(backend):
            return attention_op.attention(q, k, v, is_causal=True, window=window, softcap=cap)[0]
    return _wrap(fn, case, device)


def _varlen_inputs(case, device, dtype=None):
    """((q, k, v, dout) packed [total, H, D], cu_seqlens int32 [B + 1])."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]
    shape = (sum(case["lengths"]), case["H"], case["D"])
    tensors = tuple(torch.randn(shape, generator=g).to(device=device, dtype=dt) for _ in range(4))
    cu = torch.tensor([0, *itertools.accumulate(case["lengths"])], dtype=torch.int32, device=device)
    return tensors, cu


def _setup_varlen(provider, case, device):
    from llmfast.flash_attn import flash_attn_varlen_func

    (q, k, v, dout), cu = _varlen_inputs(case, device)
    causal, Smax = case["causal"], case["Smax"]
    if provider == "torch":
        # [B, Smax] True at real tokens; the padded batch [B, H, Smax, D], zeros at padding
        # (dout too: padding rows send no gradient), and SDPA's [B, 1, Smax, Smax] bool mask
        real = torch.arange(Smax, device=device) < torch.tensor(case["lengths"], device=device)[:, None]
        B, H, D = case["B"], case["H"], case["D"]

        def padded(x):
            out = x.new_zeros(B, Smax, H, D)
            out[real] = x
            return out.transpose(1, 2).contiguous()
        mask = real[:, None, None, :]
        if causal:
            mask = mask & torch.ones(Smax, Smax, dtype=torch.bool, device=device).tril()
        return _wrap(lambda q, k, v: tF.scaled_dot_product_attention(q, k, v, attn_mask=mask), case, device,
                     inputs=tuple(padded(t) for t in (q, k, v, dout)), pick=lambda x: x.transpose(1, 2)[real])
    backend = provider.split(":", 1)[1]

    def fn(q, k, v):
        with backends.backend(backend):
            return flash_attn_varlen_func(q, k, v, cu, cu, Smax, Smax, causal=causal)
    return _wrap(fn, case, device, inputs=(q, k, v, dout))


def setup(provider, case, device):
    if case.get("variant"):
        return _setup_variant(provider, case, device)
    if case.get("varlen"):
        return _setup_varlen(provider, case, device)
    causal, gqa = case["causal"], case["Hkv"] != case["H"]
    if provider == "torch":
        return _wrap(lambda q, k, v: tF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
                     case, device)
    if provider == "eager":
        return _wrap(lambda q, k, v: _eager_math(q, k, v, causal), case, device)
    if provider == "torch_compile":
        compiled = torch.compile(lambda q, k, v: _eager_math(q, k, v, causal), dynamic=False)
        return _wrap(compiled, case, device)
    backend = provider.split(":", 1)[1]

    def fn(q, k, v):
        with backends.backend(backend):
            return LF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return _wrap(fn, case, device)


def _reference_slice(case, qs, ks, vs, dos, **kw):
    """float64 out (fwd) or dq (fwd+bwd) of one [1, 1, L, D] query slice against its keys."""
    if case["mode"] == "fwd":
        return _ref.attention(qs, ks, vs, is_causal=case["causal"], **kw)[0][0, 0]
    qs = qs.clone().requires_grad_(True)
    o = _ref.attention(qs, ks, vs, is_causal=case["causal"], **kw)[0]
    (gq,) = torch.autograd.grad(o, qs, dos)
    return gq[0, 0]


def reference(case, device):
    """float64 result, one (b, head) slice (varlen: segment, head) at a time so the scores stay small."""
    if case.get("variant") and case["S"] > 4096:
        return None  # an [L, S] float64 slice per head at S = 8192 costs more than the timed runs
    if case.get("varlen"):  # packed [total, H, D], the real tokens only
        (q, k, v, dout), cu = _varlen_inputs(case, device, torch.float64)
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            for h in range(case["H"]):
                seg = [t[s:e, h][None, None] for t in (q, k, v, dout)]
                out[s:e, h] = _reference_slice(case, *seg)
        return out
    kw = {}
    if case.get("variant"):
        kw = dict(window=(case["window"] - 1, -1) if case["window"] > 0 else (-1, -1), softcap=case["softcap"])
    q, k, v, dout = _inputs(case, device, torch.float64)
    G = case["H"] // case["Hkv"]
    B, H = q.shape[:2]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kv = slice(h // G, h // G + 1)
            out[b, h] = _reference_slice(case, q[b:b + 1, h:h + 1], k[b:b + 1, kv], v[b:b + 1, kv],
                                         dout[b:b + 1, h:h + 1], **kw)
    return out


# ----------------------------------------------------------------------------------
# llmfast check


_VARLEN_CHECK = [37, 1, 0, 70, 90]  # segment lengths of the varlen check


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    from llmfast.flash_attn import flash_attn_func, flash_attn_varlen_func
    from llmfast.nn import functional as F

    def qkv(B, H, Hkv, L, S, D, Dv=None):
        def make(device, dtype):
            return [torch.randn(B, H, L, D, device=device).to(dtype),
                    torch.randn(B, Hkv, S, D, device=device).to(dtype),
                    torch.randn(B, Hkv, S, Dv or D, device=device).to(dtype)]
        return make

    def masked(device, dtype):
        q, k, v = qkv(2, 4, 4, 37, 53, 64)(device, dtype)
        m = torch.rand(2, 1, 37, 53, device=device) > 0.3
        m[:, :, 5] = False  # a row that sees no key
        return [q, k, v, m]

    def sinked(device, dtype):  # q [1, 97, 4, 64], k/v [1, 301, 2, 64] (Sq < Sk: bottom-right alignment), sinks [4]
        return [torch.randn(1, 97, 4, 64, device=device).to(dtype), torch.randn(1, 301, 2, 64, device=device).to(dtype),
                torch.randn(1, 301, 2, 64, device=device).to(dtype), torch.randn(4, device=device)]

    def varlen(device, dtype):  # packed [total, H, D] segments (one empty, one of 1 token), gqa 4:2, then cu_seqlens
        cu = torch.tensor([0, *itertools.accumulate(_VARLEN_CHECK)], dtype=torch.int32, device=device)
        return [torch.randn(cu[-1], H, 64, device=device).to(dtype) for H in (4, 2, 2)] + [cu]

    def packed(device, dtype):
        x = torch.randn(2, 45, 3, 4, 40, device=device).to(dtype)
        return [x]

    def flash_packed(x):  # q, k, v as strided views of one [B, L, 3, H, D] tensor
        q, k, v = x.unbind(2)
        return F.flash_attention(q, k, v, causal=True)

    return [
        ("attention", qkv(2, 4, 4, 67, 93, 64), lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        ("attention causal", qkv(1, 4, 4, 130, 130, 64),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ("attention gqa 8:2 d=80", qkv(1, 8, 2, 33, 71, 80),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        ("attention mask", masked, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
        ("attention packed qkv", packed, flash_packed),
        ("attention d=256 L=1", qkv(2, 2, 2, 1, 129, 256),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        # FlashAttention 2's options (bottom-right causal, window, softcap) and sinks, [B, S, H, D]
        ("attention fa2 window+softcap+sinks", sinked,
         lambda q, k, v, s: flash_attn_func(q, k, v, causal=True, window_size=(40, -1), softcap=10.0, sinks=s)),
        ("attention fa2 varlen causal gqa", varlen,
         lambda q, k, v, cu: flash_attn_varlen_func(q, k, v, cu, cu, max(_VARLEN_CHECK), max(_VARLEN_CHECK),
                                                    causal=True)),
    ]

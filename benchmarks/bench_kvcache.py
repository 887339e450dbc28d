"""KV-cache decode attention (flash_attn_with_kvcache): cases, providers, bytes read.

Decode is memory bound, so the unit is GB/s of K/V bytes read: ``2·B·S·Hkv·D·s`` (s =
bytes per element; every cache row is visible, q_len = 1; q and out are negligible).

Providers: ``torch`` is ``torch.nn.functional.scaled_dot_product_attention`` on the same
problem (q [B, Hq, 1, D], k/v [B, Hkv, S, D] contiguous, ``enable_gqa=True``: torch's
best layout, handed over without a copy); ``copy`` is this machine's copy bandwidth in
the same run: a ``copy_`` of half the K/V bytes (it reads and writes, so its traffic
equals the K/V bytes read and its GB/s column is read + write bandwidth; its error
column shows the precomputed attention output it returns, nothing measured);
``llmfast:<backend>`` runs ``llmfast.flash_attn.flash_attn_with_kvcache``. Paged cases
(page 16) read the same bytes through a shuffled block table.
"""
import torch
import torch.nn.functional as tF

from llmfast import backends
from llmfast.flash_attn import flash_attn_with_kvcache

OP = "kvcache"

_HQ, _HKV, _D = 32, 8, 128
# (B, S, page): page None = contiguous cache
_GPU_FULL = [(b, s, p) for b in (1, 8) for s in (4096, 16384, 32768) for p in (None, 16)]
_CPU_FULL = [(1, 4096, None), (1, 4096, 16), (1, 32768, None), (1, 32768, 16), (8, 4096, None), (8, 4096, 16),
             (8, 8192, None), (8, 8192, 16)]
_QUICK = [(1, 4096, None), (1, 4096, 16)]


def cases(quick, device, dtypes):
    table = _QUICK if quick else (_GPU_FULL if torch.device(device).type == "cuda" else _CPU_FULL)
    out = []
    for B, S, page in table:
        for dt in dtypes:
            name = f"decode B{B} Hq{_HQ} Hkv{_HKV} D{_D} S{S}" + (f" paged{page}" if page else "")
            out.append(dict(name=name, B=B, S=S, page=page, dtype=dt))
    return out


def providers(case, device):
    return ["copy"]


def work(case):
    s = torch.tensor([], dtype=case["dtype"]).element_size()
    return "GB/s", 2 * case["B"] * case["S"] * _HKV * _D * s


def _inputs(case, device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = dtype or case["dtype"]
    B, S = case["B"], case["S"]
    q = torch.randn(B, 1, _HQ, _D, generator=g).to(device=device, dtype=dt)
    k = torch.randn(B, S, _HKV, _D, generator=g).to(device=device, dtype=dt)
    v = torch.randn(B, S, _HKV, _D, generator=g).to(device=device, dtype=dt)
    return q, k, v


def _paged(k, v, page, seed=1):
    """The contiguous cache k, v [B, S, Hkv, D] as shuffled pages + block table."""
    B, S, H, D = k.shape
    n = S // page
    perm = torch.randperm(B * n, generator=torch.Generator().manual_seed(seed)).to(k.device)
    kp, vp = torch.empty_like(k).view(B * n, page, H, D), torch.empty_like(v).view(B * n, page, H, D)
    kp[perm] = k.reshape(B * n, page, H, D)
    vp[perm] = v.reshape(B * n, page, H, D)
    return kp, vp, perm.view(B, n).to(torch.int32)


def setup(provider, case, device):
    q, k, v = _inputs(case, device)
    B, S = case["B"], case["S"]
    if provider == "torch":
        qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        del k, v

        def sdpa():
            with torch.no_grad():
                return tF.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
        return sdpa
    if provider == "copy":
        with torch.no_grad():
            out = tF.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  enable_gqa=True).transpose(1, 2)
        src = k.reshape(-1)
        dst = torch.empty_like(src)
        del v

        def copy():
            dst.copy_(src)
            return out
        return copy
    backend = provider.split(":", 1)[1]
    seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
    table = None
    if case["page"]:
        k, v, table = _paged(k, v, case["page"])

    def fn():
        with backends.backend(backend), torch.no_grad():
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table)
    return fn


def reference(case, device):
    q, k, v = _inputs(case, device)
    outs = []
    for b in range(case["B"]):   # one row at a time: float64 copies of the whole cache would not fit
        qb, kb, vb = (t[b:b + 1].transpose(1, 2).double() for t in (q, k, v))
        outs.append(tF.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True).transpose(1, 2))
    return torch.cat(outs)


def checks():
    """``llmfast check`` cases: (name, make_inputs(device, dtype), fn)."""
    def make(B, Sq, S, page, fill):
        def inputs(device, dtype):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, Sq, 8, 64, generator=g).to(device=device, dtype=dtype)
            k = torch.randn(B, S, 2, 64, generator=g).to(device=device, dtype=dtype)
            v = torch.randn(B, S, 2, 64, generator=g).to(device=device, dtype=dtype)
            if page:
                k, v, table = _paged(k, v, page)
                return [q, k, v, table]
            return [q, k, v]
        return inputs

    def call(fill, causal):
        # forward only (the function has no backward): detached, so the check compares outputs
        def fn(q, k, v, table=None):
            q, k, v = q.detach(), k.detach(), v.detach()
            B = q.shape[0]
            seqlens = torch.tensor(fill[:B], dtype=torch.int32, device=q.device)
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, causal=causal)
        return fn

    return [
        ("kvcache decode", make(3, 1, 96, None, None), call([5, 96, 0], False)),
        ("kvcache paged page 3 causal", make(2, 3, 96, 3, None), call([40, 77], True)),
        ("kvcache paged page 16 gqa", make(2, 1, 96, 16, None), call([96, 17], False)),
    ]

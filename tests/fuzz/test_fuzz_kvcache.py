"""Property tests: flash_attn_with_kvcache (contiguous or paged caches of any page size,
per-row or uniform cache_seqlens, appended k/v with or without rotary, cache_batch_idx,
cache_leftpad, causal, windows, softcap, ALiBi, GQA, num_splits) on every backend.
Forward only (FlashAttention has no backward here): the output, the lse and both caches
after the in-place append are compared. Unused cache slots hold NaN when asked, so a
kernel that reads one fails."""
import math

import torch
from hypothesis import strategies as st

from llmfast.flash_attn import flash_attn_with_kvcache
from tests.fuzz.strategies import DEVICE, DTYPES, FINITE, TINY, check, fuzz_tests, seeds, specials, tensor

HEADS = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)])


@st.composite
def cases(draw, budget, nonfinite=True):
    Hq, Hkv = draw(HEADS)
    D = draw(st.sampled_from([2, 4, 8, 16, 17, 32, 64]))
    B = draw(st.integers(1, 3))
    S = draw(st.sampled_from([1, 2, 5, 16, 33, 70, 130]))
    while B * S * Hkv * D > budget and S > 1:
        S = max(1, S // 2)
    Sk = draw(st.integers(0, min(3, S)))
    paged = draw(st.booleans())
    uniform = draw(st.booleans())
    lens = [draw(st.integers(0, S - Sk)) for _ in range(1 if uniform else B)]
    return dict(Hq=Hq, Hkv=Hkv, D=D, B=B, S=S, Sk=Sk, Sq=draw(st.sampled_from([1, 1, 2, 4, 7])), lens=lens,
                uniform=uniform, paged=paged, page=draw(st.sampled_from([1, 3, 16])), dtype=draw(DTYPES),
                seed=draw(seeds()), plant=draw(specials(2, values=FINITE if nonfinite else TINY)),
                nan_slots=draw(st.booleans()),
                rotary=Sk > 0 and D % 2 == 0 and draw(st.booleans()), interleaved=draw(st.booleans()),
                batch_idx=not paged and draw(st.booleans()), leftpad=draw(st.booleans()),
                causal=draw(st.booleans()), window=draw(st.sampled_from([(-1, -1), (-1, -1), (3, 0), (0, 2), (8, 8)])),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0])), alibi=draw(st.sampled_from([None, "head", "batch"])),
                num_splits=draw(st.sampled_from([0, 0, 1, 3])), scale=draw(st.sampled_from([None, 0.2])))


def prop(backend, case):
    B, S, Sk, Sq, Hq, Hkv, D, dt = (case[k] for k in ("B", "S", "Sk", "Sq", "Hq", "Hkv", "D", "dtype"))
    g = torch.Generator().manual_seed(case["seed"] + 9)
    lens = case["lens"] * B if case["uniform"] else case["lens"]
    q = tensor((B, Sq, Hq, D), dt, case["seed"], case["plant"])
    k = tensor((B, Sk, Hkv, D), dt, case["seed"] + 1) if Sk else None
    v = tensor((B, Sk, Hkv, D), dt, case["seed"] + 2, case["plant"][:1]) if Sk else None
    table, batch_idx = None, None
    if case["paged"]:
        pages = math.ceil(S / case["page"])
        NB = B * pages + 2
        table = torch.randperm(NB, generator=g)[:B * pages].reshape(B, pages).to(torch.int32)
        kc, vc = (tensor((NB, case["page"], Hkv, D), dt, case["seed"] + i) for i in (3, 4))
        slot_row = torch.full((NB, case["page"]), -1)   # the cache row each slot belongs to
        slot_pos = torch.zeros((NB, case["page"]), dtype=torch.long)
        for b in range(B):
            for j in range(pages * case["page"]):
                slot_row[table[b, j // case["page"]], j % case["page"]] = b
                slot_pos[table[b, j // case["page"]], j % case["page"]] = j
        used = (slot_row >= 0) & (slot_pos < torch.tensor(lens + [0])[slot_row])
    else:
        NB = B + (2 if case["batch_idx"] else 0)
        kc, vc = (tensor((NB, S, Hkv, D), dt, case["seed"] + i) for i in (3, 4))
        if case["batch_idx"]:
            batch_idx = torch.randperm(NB, generator=g)[:B].to(torch.int32)
        row_len = torch.zeros(NB, dtype=torch.long)
        row_len[batch_idx.long() if batch_idx is not None else torch.arange(B)] = torch.tensor(lens)
        used = torch.arange(S)[None, :] < row_len[:, None]
    if case["nan_slots"]:
        for c in (kc, vc):
            c.masked_fill_(~used.to(DEVICE)[:, :, None, None], float("nan"))
    seqlens = lens[0] if case["uniform"] else torch.tensor(lens, dtype=torch.int32)
    leftpad = torch.tensor([min(n, 2) for n in lens], dtype=torch.int32) if case["leftpad"] else None
    cos = sin = None
    if case["rotary"]:
        R = D // 2 if D >= 4 else D
        angle = torch.rand(S + Sq, R // 2, generator=g) * 6.3   # q (causal or local) reads up to S + Sq - 1
        cos, sin = angle.cos().to(dt), angle.sin().to(dt)
    slopes = None
    if case["alibi"]:
        slopes = torch.rand((Hq,) if case["alibi"] == "head" else (B, Hq), generator=g)

    def f(q, kc, vc, k, v):
        out, lse = flash_attn_with_kvcache(
            q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
            cache_leftpad=leftpad, block_table=table, softmax_scale=case["scale"], causal=case["causal"],
            window_size=case["window"], softcap=case["softcap"], rotary_interleaved=case["interleaved"],
            alibi_slopes=slopes, num_splits=case["num_splits"], return_softmax_lse=True)
        return out, lse, kc, vc
    with torch.no_grad():
        check(f, [q, kc, vc, k, v], backend, grad=False)


test_fuzz_kvcache, test_fuzz_kvcache_long = fuzz_tests("flash_attn_with_kvcache", "kvcache", cases, prop)

"""Property tests: scaled_dot_product_attention (torch's semantics: broadcast batch dims,
GQA, bool/additive masks broadcast or expanded, fully masked rows, top-left causal),
flash_attention, and FlashAttention 2's flash_attn_func / flash_attn_varlen_func
(bottom-right causal, windows, softcap, ALiBi, sinks, dropout with a fixed seed, lse),
on every backend."""
import pytest
import torch
from hypothesis import strategies as st

from llmfast.flash_attn import flash_attn_func, flash_attn_varlen_func
from llmfast.nn import functional as LF
from tests.conftest import backends_for
from tests.fuzz.strategies import (DTYPES, FINITE, TINY, bcast, check, clip, fuzz_tests, lay, layouts, same_as_torch,
                                   seeds, sizes, specials, tensor)

HEAD_DIMS = st.sampled_from([1, 2, 3, 8, 16, 17, 32, 64])
HEADS = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1), (6, 3)])   # (H, Hkv)
WINDOWS = st.sampled_from([(-1, -1), (-1, -1), (0, 0), (2, 1), (5, -1), (-1, 0), (0, 3), (40, 40)])


def _mask(shape, kind, seed, dead):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.3
    if dead and keep.numel():
        keep[(0,) * (keep.dim() - 1)] = False   # one query row (or more, broadcast) sees no key
    if kind == "bool":
        return keep
    return torch.randn(shape, generator=g).masked_fill(~keep, float("-inf"))


def _fit(L, S, E, Ev, heads, budget):
    """Clip sequence lengths and the batch so every operand fits the budget."""
    L, S = clip([L, S], max(1, budget // max(E, Ev, 1) // heads))
    return L, S


@st.composite
def sdpa_cases(draw, budget, nonfinite=True):
    nb = draw(st.integers(0, 2))                       # batch dims before [L, E]
    batch = [draw(st.sampled_from([1, 2, 3])) for _ in range(nb)]
    E, Ev = draw(HEAD_DIMS), draw(HEAD_DIMS)
    L, S = _fit(draw(sizes()), draw(sizes()), E, Ev, max(1, int(torch.tensor(batch).prod())) * 2, budget)
    return dict(batch=batch, L=L, S=S, E=E, Ev=Ev, dtype=draw(DTYPES), seed=draw(seeds()),
                plant=draw(specials(values=FINITE if nonfinite else TINY)),
                kv_bcast=draw(st.lists(st.booleans(), min_size=nb, max_size=nb)),
                gqa=nb >= 1 and draw(st.booleans()), mask=draw(st.sampled_from([None, None, "bool", "additive"])),
                mask_bcast=draw(st.lists(st.booleans(), min_size=nb + 2, max_size=nb + 2)),
                mask_expand=draw(st.booleans()), dead=draw(st.booleans()), causal=draw(st.booleans()),
                scale=draw(st.sampled_from([None, None, 0.3, 2.0])), layout=draw(layouts()))


def sdpa_prop(backend, case):
    batch, L, S, E, Ev, dt = case["batch"], case["L"], case["S"], case["E"], case["Ev"], case["dtype"]
    kb = list(bcast(batch, case["kv_bcast"]))
    if case["gqa"] and batch[-1] % 2 == 0:
        kb[-1] = batch[-1] // 2                         # fewer kv heads than query heads
    q = tensor(tuple(batch) + (L, E), dt, case["seed"], case["plant"], 2.0)
    k = tensor(tuple(kb) + (S, E), dt, case["seed"] + 1, scale=2.0)
    v = tensor(tuple(kb) + (S, Ev), dt, case["seed"] + 2, case["plant"][:1])
    mask = None if case["causal"] else _mask(bcast(tuple(batch) + (L, S), case["mask_bcast"]), case["mask"],
                                             case["seed"] + 3, case["dead"])
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dt)
    gqa = kb != list(bcast(batch, case["kv_bcast"]))
    full = tuple(batch) + (L, S)

    def f(q, k, v, *m):
        m = (m[0].expand(full) if case["mask_expand"] else m[0]) if m else None
        return LF.scaled_dot_product_attention(lay(q, case["layout"]), k, v, m, is_causal=case["causal"],
                                               scale=case["scale"], enable_gqa=gqa)
    check(f, [q, k, v] + ([] if mask is None else [mask]), backend, grad=[True, True, True, False])
    if mask is None and not case["causal"] and S > 0:   # where torch gives no NaN for rows without keys
        same_as_torch(lambda q, k, v: f(q, k, v),
                      lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                          q, k, v, scale=case["scale"], enable_gqa=gqa), [q, k, v])


@st.composite
def bshd_cases(draw, budget, nonfinite=True):
    H, Hkv = draw(HEADS)
    D, Dv = draw(HEAD_DIMS), draw(HEAD_DIMS)
    B = draw(st.sampled_from([1, 1, 2, 3]))
    L, S = _fit(draw(sizes()), draw(sizes()), D, Dv, B * H, budget)
    return dict(B=B, L=L, S=S, H=H, Hkv=Hkv, D=D, Dv=Dv, dtype=draw(DTYPES), seed=draw(seeds()),
                plant=draw(specials(values=FINITE if nonfinite else TINY)), causal=draw(st.booleans()),
                window=draw(WINDOWS),
                softcap=draw(st.sampled_from([0.0, 0.0, 1.0, 20.0])),
                alibi=draw(st.sampled_from([None, None, "head", "batch"])), sinks=draw(st.booleans()),
                mask=draw(st.sampled_from([None, None, "bool", "additive"])), dead=draw(st.booleans()),
                dropout=draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])), lse=draw(st.booleans()),
                scale=draw(st.sampled_from([None, None, 0.3])), layout=draw(layouts()))


def _qkv(case, L=None, S=None, lead=None):
    dt = case["dtype"]
    lead = (case["B"],) if lead is None else lead
    L = case["L"] if L is None else L
    S = case["S"] if S is None else S
    q = tensor(lead + (L, case["H"], case["D"]), dt, case["seed"], case["plant"], 2.0)
    k = tensor(lead + (S, case["Hkv"], case["D"]), dt, case["seed"] + 1, scale=2.0)
    v = tensor(lead + (S, case["Hkv"], case["Dv"]), dt, case["seed"] + 2, case["plant"][:1])
    return q, k, v


def _extras(case, B):
    g = torch.Generator().manual_seed(case["seed"] + 5)
    slopes = None
    if case["alibi"]:
        slopes = torch.rand((case["H"],) if case["alibi"] == "head" else (B, case["H"]), generator=g)
    sinks = torch.randn(case["H"], generator=g).to(case["dtype"]) if case["sinks"] else None
    return slopes, sinks


def flash_attention_prop(backend, case):
    q, k, v = _qkv(case)
    B, L, H, S = case["B"], case["L"], case["H"], case["S"]
    mask = None if case["causal"] else _mask((B, H, L, S), case["mask"], case["seed"] + 3, case["dead"])

    def f(q, k, v, *m):
        return LF.flash_attention(lay(q, case["layout"]), k, v, causal=case["causal"], scale=case["scale"],
                                  dropout_p=case["dropout"], seed=7, return_lse=case["lse"],
                                  attn_mask=m[0] if m else None)
    check(f, [q, k, v] + ([] if mask is None else [mask]), backend, grad=[True, True, True, False])


def flash_attn_func_prop(backend, case):
    q, k, v = _qkv(case)
    slopes, sinks = _extras(case, case["B"])

    def f(q, k, v, *s):
        r = flash_attn_func(lay(q, case["layout"]), k, v, softmax_scale=case["scale"], causal=case["causal"],
                            window_size=case["window"], softcap=case["softcap"], alibi_slopes=slopes,
                            return_attn_probs=case["lse"], sinks=s[0] if s else None)
        return r[:2] if case["lse"] else r   # (out, lse): S_dmask is empty
    check(f, [q, k, v] + ([] if sinks is None else [sinks]), backend)


@st.composite
def varlen_cases(draw, budget, nonfinite=True):
    base = draw(bshd_cases(budget, nonfinite))
    n = draw(st.integers(1, 4))
    lq = [draw(st.sampled_from([0, 1, 2, 5, 9, 17])) for _ in range(n)]
    lk = [draw(st.sampled_from([0, 1, 3, 6, 17])) for _ in range(n)]
    return dict(base, lq=lq, lk=lk, tail_q=draw(st.sampled_from([0, 0, 2])), tail_k=draw(st.sampled_from([0, 0, 1])))


def flash_attn_varlen_prop(backend, case):
    lq, lk = case["lq"], case["lk"]
    cu = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), dtype=torch.int32) for x in (lq, lk)]
    q, k, v = _qkv(case, L=sum(lq) + case["tail_q"], S=sum(lk) + case["tail_k"], lead=())
    slopes, sinks = _extras(case, len(lq))

    def f(q, k, v, *s):
        r = flash_attn_varlen_func(lay(q, case["layout"]), k, v, cu[0], cu[1], max(lq), max(lk),
                                   softmax_scale=case["scale"], causal=case["causal"], window_size=case["window"],
                                   softcap=case["softcap"], alibi_slopes=slopes, return_attn_probs=case["lse"],
                                   sinks=s[0] if s else None)
        return r[:2] if case["lse"] else r
    check(f, [q, k, v] + ([] if sinks is None else [sinks]), backend)


test_fuzz_sdpa, test_fuzz_sdpa_long = fuzz_tests("scaled_dot_product_attention", "attention", sdpa_cases, sdpa_prop)
test_fuzz_flash_attention, test_fuzz_flash_attention_long = fuzz_tests("flash_attention", "attention", bshd_cases,
                                                                       flash_attention_prop)
test_fuzz_flash_attn_func, test_fuzz_flash_attn_func_long = fuzz_tests("flash_attn_func", "attention", bshd_cases,
                                                                       flash_attn_func_prop)
test_fuzz_flash_attn_varlen, test_fuzz_flash_attn_varlen_long = fuzz_tests("flash_attn_varlen_func", "attention",
                                                                           varlen_cases, flash_attn_varlen_prop)


# Inputs the fuzzing found, fixed: q/k/v with no elements (L = 0) or a head dim of 1 whose last
# stride is not 1 were refused by the cpu/cuda kernels' 'last dim must be contiguous' check.
FOUND = [
    dict(batch=[2], L=2, S=0, E=1, Ev=1, dtype=torch.float32, seed=0, plant=[], kv_bcast=[False], gqa=False,
         mask=None, mask_bcast=[False] * 3, mask_expand=False, dead=False, causal=False, scale=None,
         layout="transposed"),
    dict(batch=[2, 2], L=0, S=3, E=3, Ev=1, dtype=torch.bfloat16, seed=5334, plant=[], kv_bcast=[False, True],
         gqa=True, mask="bool", mask_bcast=[False, True, True, True], mask_expand=False, dead=True, causal=False,
         scale=None, layout="strided"),
    dict(batch=[1, 3], L=0, S=64, E=16, Ev=1, dtype=torch.bfloat16, seed=0, plant=[], kv_bcast=[True, True],
         gqa=True, mask=None, mask_bcast=[True, False, False, False], mask_expand=False, dead=True, causal=True,
         scale=None, layout="strided"),
]


@pytest.mark.parametrize("backend", backends_for("attention", emu=True))
@pytest.mark.parametrize("case", FOUND, ids=["S0_transposed", "L0_strided", "L0_strided_gqa"])
def test_found_by_fuzzing(backend, case):
    sdpa_prop(backend, case)

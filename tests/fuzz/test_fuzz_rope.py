"""Property tests: apply_rotary_pos_emb (Hugging Face's: heads on dim 1 or 2, GQA, partial
rotary, per-batch angles, angles in fp32 or the input's dtype) and rotary_embedding
(flash-attn's apply_rotary_emb: NeoX or GPT-J pairing, [S_ro, R/2] or per-batch angles, int or
per-sequence seqlen_offsets, packed sequences with cu_seqlens) on every backend."""
import torch
from hypothesis import strategies as st

from llmfast.nn import functional as LF
from tests.fuzz.strategies import (DTYPES, check, clip, fuzz_tests, lay, layouts, same_as_torch, seeds, sizes,
                                   specials, tensor)


@st.composite
def cases(draw, budget, nonfinite=True):
    H, Hk = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]))
    D = draw(st.sampled_from([2, 4, 6, 8, 16, 18, 64]))
    R = 2 * draw(st.integers(1, D // 2))
    B = draw(st.integers(1, 3))
    (S,) = clip([draw(sizes())], max(1, budget // (B * H * D)))
    return dict(B=B, S=S, H=H, Hk=Hk, D=D, R=R, dtype=draw(DTYPES), seed=draw(seeds()),
                plant=draw(specials(nonfinite=nonfinite)), heads_first=draw(st.booleans()),
                angles_fp32=draw(st.booleans()), per_batch=draw(st.booleans()), interleaved=draw(st.booleans()),
                extra_rows=draw(st.sampled_from([0, 0, 3])), layout=draw(layouts()),
                offsets=draw(st.sampled_from(["none", "int", "tensor"])), packed=draw(st.booleans()))


def _angles(case, rows, half):
    g = torch.Generator().manual_seed(case["seed"] + 7)
    theta = torch.rand((case["B"] if case["per_batch"] else 1, rows, half), generator=g) * 50
    dt = torch.float32 if case["angles_fp32"] else case["dtype"]
    return theta.cos().to(dt), theta.sin().to(dt)


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def hf_prop(backend, case):
    B, S, H, Hk, D, R, dt = (case[k] for k in ("B", "S", "H", "Hk", "D", "R", "dtype"))
    shape = (lambda h: (B, h, S, D)) if case["heads_first"] else (lambda h: (B, S, h, D))
    q = tensor(shape(H), dt, case["seed"], case["plant"])
    k = tensor(shape(Hk), dt, case["seed"] + 1)
    c, s = _angles(case, S, R // 2)
    cos, sin = torch.cat((c, c), -1), torch.cat((s, s), -1)   # HF's cat(freqs, freqs)
    dim = 1 if case["heads_first"] else 2

    def f(q, k, cos, sin):
        return LF.apply_rotary_pos_emb(lay(q, case["layout"]), k, cos, sin, unsqueeze_dim=dim)
    check(f, [q, k, cos, sin], backend, grad=[True, True, False, False])

    def hf(q, k, cos, sin):   # transformers' apply_rotary_pos_emb, partial rotary as Phi-3 does it
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
        out = []
        for x in (q, k):
            xr, xp = x[..., :R], x[..., R:]
            out.append(torch.cat((xr * cos + _rotate_half(xr) * sin, xp), -1))
        return tuple(out)
    same_as_torch(f, hf, [q, k, cos, sin])


def fa_prop(backend, case):
    B, S, H, D, R, dt = (case[k] for k in ("B", "S", "H", "D", "R", "dtype"))
    g = torch.Generator().manual_seed(case["seed"] + 3)
    shift = {"none": 0, "int": 2, "tensor": torch.randint(0, 3, (B,), generator=g, dtype=torch.int32)}[case["offsets"]]
    kw = dict(interleaved=case["interleaved"], seqlen_offsets=shift)
    if case["packed"]:   # B segments of 0..S tokens, then extra_rows tokens of padding that pass through
        lengths = torch.randint(0, S + 1, (B,), generator=g)
        cu = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0))).to(torch.int32)
        x = tensor((int(cu[-1]) + case["extra_rows"], H, D), dt, case["seed"], case["plant"])
        kw.update(cu_seqlens=cu.to(x.device), max_seqlen=S)
    else:
        x = tensor((B, S, H, D), dt, case["seed"], case["plant"])
    if isinstance(shift, torch.Tensor):
        kw["seqlen_offsets"] = shift.to(x.device)
    cos, sin = _angles(case, S + case["extra_rows"] + (0 if case["offsets"] == "none" else 2), R // 2)
    if not case["per_batch"]:
        cos, sin = cos[0], sin[0]                               # [S_ro, R/2]
    check(lambda x, c, s: LF.rotary_embedding(lay(x, case["layout"]), c, s, **kw), [x, cos, sin], backend,
          grad=[True, False, False])


test_fuzz_apply_rotary_pos_emb, test_fuzz_apply_rotary_pos_emb_long = fuzz_tests("apply_rotary_pos_emb", "rope",
                                                                                  cases, hf_prop)
test_fuzz_rotary_embedding, test_fuzz_rotary_embedding_long = fuzz_tests("rotary_embedding", "rope", cases, fa_prop)

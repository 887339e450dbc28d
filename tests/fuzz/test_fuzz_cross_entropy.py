"""Property tests: cross_entropy (class-index targets int64/uint8 with ignored rows, 1-D,
[N, C] and [N, C, d] inputs, class weights, every reduction, label smoothing, probability
targets), fused_linear_cross_entropy (chunking, bias, class weights, softcap, dtype=) and
perplexity, on every backend. llmfast's torch reference *is* torch's cross_entropy."""
import torch
from hypothesis import strategies as st

from llmfast.nn import functional as LF
from tests.fuzz.strategies import DTYPES, check, clip, fuzz_tests, lay, layouts, seeds, sizes, specials, tensor

REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
SMOOTHING = st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])
# +inf logits make torch's whole row NaN, gradient included, and the kernels' (they gave 0 at
# the finite classes before)
LOGITS = ["inf", "-inf", "nan", "1e4", "-1e4", "denormal"]


def _targets(shape, C, case, seed):
    """Class indices in [0, C) with a fraction set to ignore_index (uint8 when asked and C fits)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(C, 1), shape, generator=g)
    t[torch.rand(shape, generator=g) < case["p_ignore"]] = case["ignore_index"]
    if case["uint8"] and C <= 255 and 0 <= case["ignore_index"] <= 255:
        t = t.to(torch.uint8)
    return t


def _common(draw, nonfinite):
    return dict(dtype=draw(DTYPES), seed=draw(seeds()), plant=draw(specials(values=LOGITS, nonfinite=nonfinite)),
                reduction=draw(REDUCTIONS),
                label_smoothing=draw(SMOOTHING), weighted=draw(st.booleans()), uint8=draw(st.booleans()),
                p_ignore=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])), ignore_index=draw(st.sampled_from([-100, 0, 1])),
                scale=draw(st.sampled_from([1.0, 4.0, 30.0])))


@st.composite
def ce_cases(draw, budget, nonfinite=True):
    rank = draw(st.integers(1, 3))
    shape = clip([draw(sizes(1 if i == 1 or rank == 1 else 0)) for i in range(rank)], budget, keep=(min(1, rank - 1),))
    return dict(_common(draw, nonfinite), shape=shape, probs=draw(st.integers(0, 5)) == 0, layout=draw(layouts()))


def ce_prop(backend, case):
    shape, rank = case["shape"], len(case["shape"])
    C = shape[0] if rank == 1 else shape[1]
    x = tensor(shape, case["dtype"], case["seed"], case["plant"], case["scale"])
    w = tensor((C,), torch.float32, case["seed"] + 1).abs().to(case["dtype"]) if case["weighted"] else None
    if case["probs"]:
        t = torch.softmax(tensor(shape, torch.float32, case["seed"] + 2), 0 if rank == 1 else 1).to(case["dtype"])
    else:
        t = _targets(() if rank == 1 else (shape[0],) + tuple(shape[2:]), C, case, case["seed"] + 2)
    # torch refuses ignore_index with probability targets: only the default goes with them
    kw = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"],
              ignore_index=-100 if case["probs"] else case["ignore_index"])
    check(lambda x, t, w: LF.cross_entropy(lay(x, case["layout"]), t, w, **kw), [x, t, w], backend,
          grad=[True, False, False])


@st.composite
def flce_cases(draw, budget, nonfinite=True):
    lead = [draw(sizes(large=False)) for _ in range(draw(st.integers(1, 2)))]
    H, V = draw(sizes(1)), draw(sizes(1))
    H, V = clip([H, V], budget)
    lead = clip(lead, max(1, budget // max(V, H)))
    return dict(_common(draw, nonfinite), lead=lead, H=H, V=V, bias=draw(st.booleans()),
                chunk_size=draw(st.sampled_from([None, None, 1, 3, 7, 64])),
                softcap=draw(st.sampled_from([None, None, 0.0, 1.5, 30.0])),
                out_fp32=draw(st.booleans()), layout=draw(layouts()))


def flce_prop(backend, case):
    lead, H, V, dt = tuple(case["lead"]), case["H"], case["V"], case["dtype"]
    h = tensor(lead + (H,), dt, case["seed"], case["plant"], case["scale"])
    W = tensor((V, H), dt, case["seed"] + 1, scale=H ** -0.5)
    b = tensor((V,), dt, case["seed"] + 2) if case["bias"] else None
    cw = tensor((V,), torch.float32, case["seed"] + 3).abs().to(dt) if case["weighted"] else None
    t = _targets(lead, V, case, case["seed"] + 4)
    kw = dict(ignore_index=case["ignore_index"], reduction=case["reduction"], label_smoothing=case["label_smoothing"],
              chunk_size=case["chunk_size"], softcap=case["softcap"],
              dtype=torch.float32 if case["out_fp32"] else None)
    check(lambda h, W, t, b, cw: LF.fused_linear_cross_entropy(lay(h, case["layout"]), W, t, b, class_weight=cw,
                                                               **kw),
          [h, W, t, b, cw], backend, grad=[True, True, False, True, False])


def ppl_prop(backend, case):
    lead, V = tuple(case["lead"]), case["V"]
    x = tensor(lead + (V,), case["dtype"], case["seed"], case["plant"], case["scale"])
    t = _targets(lead, V, case, case["seed"] + 1)
    check(lambda x, t: LF.perplexity(lay(x, case["layout"]), t, ignore_index=case["ignore_index"]), [x, t], backend)


test_fuzz_cross_entropy, test_fuzz_cross_entropy_long = fuzz_tests("cross_entropy", "cross_entropy", ce_cases, ce_prop)
test_fuzz_fused_linear_cross_entropy, test_fuzz_fused_linear_cross_entropy_long = fuzz_tests(
    "fused_linear_cross_entropy", "fused_linear_cross_entropy", flce_cases, flce_prop)
test_fuzz_perplexity, test_fuzz_perplexity_long = fuzz_tests("perplexity", "cross_entropy", flce_cases, ppl_prop)

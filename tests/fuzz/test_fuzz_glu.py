"""Property tests: swiglu and geglu (separate or packed gate/up, any rank, both gelu
forms) on every backend, against torch's ``act(gate) * up``."""
import torch
from hypothesis import strategies as st

from llmfast.nn import functional as LF
from tests.fuzz.strategies import (DTYPES, check, clip, fuzz_tests, lay, layouts, same_as_torch, seeds, sizes,
                                   specials, tensor)

F = torch.nn.functional


@st.composite
def cases(draw, budget, nonfinite=True):
    rank = draw(st.integers(1, 3))
    shape = clip([draw(sizes()) for _ in range(rank)], budget // 2)
    return dict(shape=shape, dtype=draw(DTYPES), seed=draw(seeds()), plant=draw(specials(nonfinite=nonfinite)),
                packed=draw(st.booleans()), approximate=draw(st.sampled_from(["tanh", "none"])),
                layout=draw(layouts()), scale=draw(st.sampled_from([1.0, 3.0, 30.0])))


def _prop(name):
    def ours(g, u, approximate):
        return LF.swiglu(g, u) if name == "swiglu" else LF.geglu(g, u, approximate)

    def theirs(g, u, approximate):
        if u is None:
            g, u = g.chunk(2, -1)
        return (F.silu(g) if name == "swiglu" else F.gelu(g, approximate=approximate)) * u

    def prop(backend, case):
        shape, a = case["shape"], case["approximate"]
        if case["packed"]:
            x = tensor(shape[:-1] + (2 * shape[-1],), case["dtype"], case["seed"], case["plant"], case["scale"])
            check(lambda x: ours(lay(x, case["layout"]), None, a), [x], backend)
            same_as_torch(lambda x: ours(x, None, a), lambda x: theirs(x, None, a), [x])
        else:
            g = tensor(shape, case["dtype"], case["seed"], case["plant"], case["scale"])
            u = tensor(shape, case["dtype"], case["seed"] + 1, case["plant"][:1])
            check(lambda g, u: ours(lay(g, case["layout"]), u, a), [g, u], backend)
            same_as_torch(lambda g, u: ours(g, u, a), lambda g, u: theirs(g, u, a), [g, u])
    return prop


test_fuzz_swiglu, test_fuzz_swiglu_long = fuzz_tests("swiglu", "glu", cases, _prop("swiglu"))
test_fuzz_geglu, test_fuzz_geglu_long = fuzz_tests("geglu", "glu", cases, _prop("geglu"))

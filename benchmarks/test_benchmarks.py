"""pytest-benchmark entry: the same cases and providers as ``llmfast bench --quick``.

    pytest benchmarks/ --benchmark-only            # CPU, float32
    LLMFAST_BENCH_DEVICE=cuda pytest benchmarks/   # on a GPU
"""
import os

import pytest
import torch

from llmfast.bench import bench_modules, case_providers

DEVICE = os.environ.get("LLMFAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def _params():
    out = []
    for op, mod in sorted(bench_modules().items()):
        for case in mod.cases(True, DEVICE, [torch.float32]):
            for prov in case_providers(mod, case, DEVICE):
                if prov == "torch_compile":
                    continue  # compile time dwarfs the kernels here; `llmfast bench` times it
                out.append(pytest.param(mod, case, prov, id=f"{op}-{case['name']}-{prov}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("mod,case,provider", _params())
def test_bench(benchmark, mod, case, provider):
    fn = mod.setup(provider, case, DEVICE)
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
    benchmark.extra_info.update(op=mod.OP, case=case["name"], provider=provider)

"""Every Triton kernel config compiles for sm_80 and sm_90, without a GPU.

``triton.compile`` needs real JITFunctions, which TRITON_INTERPRET=1 (set for the
rest of the suite) replaces by interpreted ones, so the compiles run in a child
process started without the interpreter.
"""
import json
import os
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module("llmfast.kernels." + sys.argv[1])
arch = int(sys.argv[2])
target = GPUTarget("cuda", arch, 32)
out = []
for entry in mod.COMPILE_CONFIGS():
    kernel, sig, constexprs = entry[:3]
    options = entry[3] if len(entry) > 3 else {}  # e.g. num_warps, num_stages
    full = dict(sig)
    for k, v in constexprs.items():
        full[k] = "constexpr"
    src = ASTSource(fn=kernel, signature=full, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    c = triton.compile(src, target=target, options=options)
    out.append(dict(kernel=kernel.__name__, constexprs=constexprs, shared=c.metadata.shared,
                    wgmma="wgmma" in c.asm["ptx"], ptx=len(c.asm["ptx"]) > 0, cubin=len(c.asm["cubin"]) > 0))
print(json.dumps(out))
"""


def _kernel_modules():
    import llmfast.kernels as pkg
    return [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("module", _kernel_modules())
def test_triton_configs_compile(module, arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _CHILD, module, str(arch)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, f"kernels/{module}.py lists no COMPILE_CONFIGS"
    for r in results:
        assert r["ptx"] and r["cubin"], r
        # every config must fit the smallest shared memory of the two (sm_80: 163 KB per block)
        assert r["shared"] <= 163 * 1024, r

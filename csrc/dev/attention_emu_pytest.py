"""Dev only: run tests/test_attention_cuda.py without a GPU, through the CPU warp emulator.

    python csrc/dev/attention_emu_pytest.py [pytest args, e.g. -k "fp16 and d64" -x]

Builds csrc/dev/attention_emu_ext.cpp (attention.cu's kernels and torch binding compiled for
CPU tensors, kernels emulated warp by warp), registers it as the CPU implementation of
llmfast::attention_fwd/bwd in this process, and runs a copy of the CUDA test file with the
device switched to "cpu". Slow (every CUDA thread is a fiber): use -k to pick cases. Run it
only in a process where nothing else registers a CPU attention kernel.
"""
import os
import re
import sys
import tempfile

import pytest
import torch
from torch.utils import cpp_extension

import llmfast  # noqa: F401  (defines the llmfast:: schemas)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build():
    build_dir = os.path.join(tempfile.gettempdir(), "llmfast_attention_emu")
    os.makedirs(build_dir, exist_ok=True)
    cuda_inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    cpp_extension.load(
        name="llmfast_attention_emu",
        sources=[os.path.join(ROOT, "csrc", "dev", "attention_emu_ext.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), cuda_inc],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )


def patched_tests():
    src = open(os.path.join(ROOT, "tests", "test_attention_cuda.py")).read()
    src = src.replace('device="cuda"', 'device="cpu"')
    src = re.sub(r"pytestmark = \[.*?\n\]\n", "pytestmark = []\n", src, flags=re.S)
    # no second device to mismatch with on a CPU-only machine
    src = src.replace('    with pytest.raises(RuntimeError, match="same device"):\n        fwd(q, k.cpu(), v)\n', "")
    out = os.path.join(tempfile.gettempdir(), "llmfast_attention_emu", "test_attention_emu.py")
    with open(out, "w") as f:
        f.write(src)
    return out


if __name__ == "__main__":
    build()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("llmfast::attention_fwd", "CPU")
    path = patched_tests()
    sys.exit(pytest.main([path, "-p", "no:cacheprovider", "--rootdir", os.path.dirname(path)] + sys.argv[1:]))

"""Shared test setup.

The suite runs every available backend on CPU tensors: ``cpu`` (C++), ``torch``
(the reference), ``triton`` under the interpreter and ``cuda`` through the warp
emulator (csrc/dev/cuda_emu.h: csrc/cuda/*.cu compiled for the CPU as llmfast._emu).
TRITON_INTERPRET must be set before triton is imported, and LLMFAST_CUDA_EMU before
llmfast is, so both are set here unless the caller chose (``=0`` turns either off; a
GPU run sets both to 0). CUDA tests on a GPU run when one is visible and skip cleanly
otherwise.
"""
import os

_ON_GPU = os.environ.get("LLMFAST_TEST_DEVICE") == "cuda"
os.environ.setdefault("TRITON_INTERPRET", "0" if _ON_GPU else "1")
os.environ.setdefault("LLMFAST_CUDA_EMU", "0" if _ON_GPU else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import llmfast  # noqa: E402

DEVICE = os.environ.get("LLMFAST_TEST_DEVICE", "cpu")


def backends_for(op, device=DEVICE, emu=False):
    """pytest params: one per llmfast backend (torch excluded), skipped with the reason when unavailable.

    The emulated ``cuda`` backend (CPU tensors) runs every CUDA thread as a fiber: only
    tests that ask for it with ``emu=True`` (small shapes) include it.
    """
    out = []
    for name, why in llmfast.available(op, device).items():
        if name == "torch":
            continue
        if name == "cuda" and torch.device(device).type == "cpu" and why is None and not emu:
            why = "the emulated CUDA kernels run in the small-shape tests only (emu=True)"
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test. Tiny models gain nothing from threads, and on a
    shared 2-core machine OpenMP barriers across busy cores make each small op ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(step)``: ``llmfast train`` gets Ctrl-C as its (0-based) step ``step`` begins;
    ``interrupt_training(None)`` restores the real step."""
    from llmfast.train import loop
    real_step = loop.train_step

    def at(step):
        def interrupted(model, opt, data, s, *a):
            if s == step:
                raise KeyboardInterrupt
            return real_step(model, opt, data, s, *a)
        monkeypatch.setattr(loop, "train_step", real_step if step is None else interrupted)
    return at

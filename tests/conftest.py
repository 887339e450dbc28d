"""Shared test setup.

The suite runs every available backend on CPU tensors: ``cpu`` (C++), ``torch``
(the reference) and ``triton`` under the interpreter. TRITON_INTERPRET must be
set before triton is imported, so it is set here unless the caller chose
(``TRITON_INTERPRET=0`` turns the Triton CPU tests off; a GPU run sets it to 0).
CUDA tests run when a GPU is visible and skip cleanly otherwise.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LLMFAST_TEST_DEVICE") == "cuda" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import llmfast  # noqa: E402

DEVICE = os.environ.get("LLMFAST_TEST_DEVICE", "cpu")


def backends_for(op, device=DEVICE):
    """pytest params: one per llmfast backend (torch excluded), skipped with the reason when unavailable."""
    out = []
    for name, why in llmfast.available(op, device).items():
        if name == "torch":
            continue
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

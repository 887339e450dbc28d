"""llmfast.backend(): the choice is per thread and per asyncio task (a ContextVar)."""
import asyncio
import threading

import pytest
import torch

import llmfast
from llmfast import backends
from llmfast.nn import functional as LF

from conftest import DEVICE


def _runnable(op):
    # Triton's interpreter patches triton.language globally while it runs a kernel, so two
    # threads interpreting at once break each other (compiled Triton on a GPU does not)
    interpreted = DEVICE == "cpu"
    return [name for name, why in llmfast.available(op, DEVICE).items()
            if why is None and not (name == "triton" and interpreted)]


def test_eight_threads_each_see_their_own_backend():
    names = _runnable("softmax")
    assert "torch" in names and len(names) >= 2, names
    choices = [names[i % len(names)] for i in range(8)]
    x = torch.randn(4, 33, device=DEVICE)
    expected = torch.softmax(x, -1)
    barrier = threading.Barrier(len(choices), timeout=60)
    errors = []

    def work(name):
        try:
            with llmfast.backend(name):
                barrier.wait()  # every thread is inside its own `with` block at once
                for _ in range(20):
                    assert backends.current() == name
                    assert backends.resolve("softmax", x) == name
                    torch.testing.assert_close(LF.softmax(x, -1), expected)
                barrier.wait()
            assert backends.current() == backends._ENV
        except Exception as e:  # reported below: an assert in a thread would be lost
            errors.append((name, repr(e)))

    threads = [threading.Thread(target=work, args=(c,)) for c in choices]
    with llmfast.backend("torch"):  # the main thread's choice does not leak into new threads
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backends.current() == "torch"
    assert not errors, errors


def test_asyncio_tasks_see_their_own_backend():
    names = _runnable("layer_norm")

    async def task(name):
        with llmfast.backend(name):
            await asyncio.sleep(0)  # let the other tasks enter their blocks
            assert backends.current() == name
            await asyncio.sleep(0)
            return backends.resolve("layer_norm", torch.zeros(1, device=DEVICE))

    async def main():
        return await asyncio.gather(*(task(n) for n in names * 2))

    assert asyncio.run(main()) == names * 2


def test_nested_blocks_restore_and_bad_names_raise():
    with llmfast.backend("torch"):
        with llmfast.backend("cpu"):
            assert backends.current() == "cpu"
        assert backends.current() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        with llmfast.backend("tpu"):
            pass

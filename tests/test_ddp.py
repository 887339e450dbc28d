"""DistributedDataParallel (gloo, 2 processes): the same gradients as one process on the whole batch.

Each rank runs half of the batch through llmfast's ops; DDP averages the gradients,
which for a mean loss over equal halves is the full batch's gradient.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _model():
    from llmfast.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))


def _batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (4, 16), generator=g)
    return idx, idx.roll(-1, 1)


def _worker(rank, init_file, out_dir, backend):
    torch.set_num_threads(1)
    import llmfast

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        idx, tgt = _batch()
        half = idx.shape[0] // WORLD
        with llmfast.backend(backend):
            _, loss = model(idx[rank * half:(rank + 1) * half], tgt[rank * half:(rank + 1) * half])
            loss.backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_two_processes_same_grads(tmp_path):
    import llmfast

    backend = "cpu" if llmfast.available("softmax")["cpu"] is None else "torch"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD, join=True)

    model = _model()
    idx, tgt = _batch()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with llmfast.backend(backend):
            _, loss = model(idx, tgt)
            loss.backward()
    finally:
        torch.set_num_threads(n)
    want = {name: p.grad for name, p in model.named_parameters()}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"rank {rank}, grad of {name}: {m}")

"""Data-parallel ``llmfast train``: torchrun or ``--nproc N``, DDP or FSDP2, sharded checkpoints.

    llmfast train --nproc 2 --parallel fsdp            # N local processes (torch's elastic launcher)
    torchrun --nproc-per-node 8 -m llmfast train ...   # the same run under a plain torchrun (any nodes)

Every rank builds the same model (same seed), draws the same global batch of each step
and trains on its own ``batch_size / world`` rows of it (``ByteData.shard``), so the
global batch, and hence the curve, is the same for any number of processes. DDP averages
the gradients; FSDP2 (``fully_shard`` on each block, then the root) shards parameters,
gradients and optimizer state. Losses are all-reduced; only rank 0 prints and writes.
The process group has a timeout (``--dist-timeout``): a rank that dies or stops makes the
others fail within it, and the job exits non-zero naming the rank, instead of hanging.

Checkpoints of a distributed run go through ``torch.distributed.checkpoint`` (DCP): each
rank writes its shards into ``OUT_DIR/dcp-<step>/``; rank 0 then writes ``progress.pt``
(step, curve, losses, settings, RNG) into it, atomically and last, so a folder without it
is incomplete and ignored. DCP reshards on load: a run resumes on any number of processes
(``--resume``, which picks the newest of ckpt.pt and the sharded checkpoints). At the end
of the run, :func:`consolidate` gathers the last one into the single-file ``ckpt.pt``
that ``llmfast generate`` reads (``llmfast.train.dist.consolidate(OUT_DIR)`` does it for
an interrupted run).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from llmfast.cli import CLIError
from llmfast.train.checkpoints import CHECKPOINT_NAME, atomic_write, load_checkpoint

PROGRESS_NAME = "progress.pt"
# Fault injection for the tests: "RANK:STEP[:raise|exit|hang]" makes that rank fail before that step.
FAULT_ENV = "LLMFAST_TRAIN_FAULT"


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside one."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def launch(args, nproc: int) -> int:
    """Run ``cmd_train(args)`` in ``nproc`` local processes under torch's elastic agent (what torchrun runs)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world()[1] > 1:
        raise CLIError("--nproc inside a distributed job (torchrun already started the processes); drop --nproc")
    # torchrun's default for several local processes: one thread each, not every core each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, _worker)(args)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())   # the first to fail; the agent stopped the others
        msg = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        msg = (msg or "").strip().removeprefix("CLIError: ").splitlines()
        raise CLIError(f"rank {rank} of {nproc} failed (exit code {failure.exitcode})"
                       + (f": {msg[0][:300]}" if msg else "; its stderr above says why")) from None
    return 0


def _worker(args):
    import logging

    from torch.distributed.elastic.multiprocessing.errors import record

    from llmfast.train.cli import cmd_train

    args.nproc = None   # this process is one of them
    try:
        # record(): the exception's message reaches the launcher (ChildFailedError.failures)
        rc = record(cmd_train)(args)
    except CLIError:
        # a message for the user, which the launcher prints: no traceback logged on the way
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        raise
    if rc:
        raise SystemExit(rc)


def init(device, timeout_s: float):
    """Join the process group (NCCL for CUDA, gloo for CPU); returns this rank's device."""
    rank, n, local = world()
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def quiet_unless_rank0():
    """stdout off on ranks other than 0 (their errors still reach stderr)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return contextlib.redirect_stdout(open(os.devnull, "w"))
    return contextlib.nullcontext()


def wrap(model, parallel: str, device):
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # The blocks return (delta, residual) views; FSDP warns that an in-place op on a view would skip
        # its backward hook. The GPT never writes into them (each norm reads them out of place).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:   # one all-gather per block: the others stay sharded meanwhile
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean(x: float, device) -> float:
    """The mean of ``x`` over the ranks (each rank's loss is over the same number of tokens)."""
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at, *how = spec.split(":")
    if int(rank) != world()[0] or int(at) != step:
        return
    how = how[0] if how else "raise"
    if how == "exit":
        os._exit(3)
    if how == "hang":
        time.sleep(10**6)
    raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {rank} at step {step}")


def _unwrapped(model):
    return getattr(model, "module", model)


def _state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def save(out_dir: Path, model, opt, step: int, progress: dict) -> None:
    """A sharded checkpoint of ``step`` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    from llmfast.train.checkpoints import FORMAT, rng_state

    folder = out_dir / f"dcp-{step:08d}"
    dcp.save(_state(model, opt), checkpoint_id=str(folder))
    if dist.get_rank() == 0:
        atomic_write(folder / PROGRESS_NAME, dict(format=FORMAT, config=_unwrapped(model).config.to_dict(),
                                                  rng=rng_state(), step=step, **progress))
        for old in sharded_checkpoints(out_dir)[:-1]:   # only once the new one is complete
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_checkpoints(out_dir: Path) -> list[Path]:
    """The complete sharded checkpoints under ``out_dir``, oldest first."""
    return sorted(p.parent for p in Path(out_dir).glob(f"dcp-*/{PROGRESS_NAME}"))


def latest(out_dir: Path):
    """The newest checkpoint of a run as a dict: ckpt.pt's, or a sharded one's progress with ``sharded=folder``."""
    found = [load_checkpoint(out_dir / CHECKPOINT_NAME)] if (out_dir / CHECKPOINT_NAME).exists() else []
    shards = sharded_checkpoints(out_dir)
    if shards:
        found.append(dict(load_checkpoint(shards[-1] / PROGRESS_NAME), sharded=str(shards[-1])))
    if not found:
        raise CLIError(f"no checkpoint in {str(out_dir)!r} (neither {CHECKPOINT_NAME} nor dcp-*/{PROGRESS_NAME})")
    return max(found, key=lambda c: (c["step"], "sharded" in c))


def load(folder, model, opt) -> None:
    """Fill ``model`` and ``opt`` (any wrapping, any number of ranks, or none) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, opt)
    try:
        with warnings.catch_warnings():
            # "torch.distributed ... uninitialized, assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot read sharded checkpoint {str(folder)!r}: {msg}") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(out_dir) -> Path:
    """Write the run's newest sharded checkpoint as the single-file ``OUT_DIR/ckpt.pt`` (one process)."""
    from llmfast.train import loop
    from llmfast.train.checkpoints import build_model, save_checkpoint

    out_dir = Path(out_dir)
    shards = sharded_checkpoints(out_dir)
    if not shards:
        raise CLIError(f"no sharded checkpoint in {str(out_dir)!r}")
    progress = load_checkpoint(shards[-1] / PROGRESS_NAME)
    target = out_dir / CHECKPOINT_NAME
    if target.exists() and load_checkpoint(target)["step"] > progress["step"]:
        # a later single-process run (a resumption) wrote it: never replace newer weights with older ones
        raise CLIError(f"{str(target)!r} (step {load_checkpoint(target)['step']}) is newer than the newest sharded "
                       f"checkpoint {str(shards[-1])!r} (step {progress['step']}); nothing to consolidate")
    model = build_model(progress["config"], "cpu")
    opt = loop.make_optimizer(model, progress["train"])
    load(shards[-1], model, opt)
    keep = {k: v for k, v in progress.items() if k not in ("format", "config")}
    save_checkpoint(target, model, opt, **keep)
    return target

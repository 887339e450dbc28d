"""Checkpoints: one ``ckpt.pt`` per run, written durably, read as plain data.

A checkpoint holds the model and optimizer state, the RNG states (torch, numpy, Python),
the model config and training settings, the step (which is also the data position:
batches are a function of (seed, step)), the token count, the validation curve and the
per-step training losses so far, and which corpus it was trained on: everything
``--resume`` needs to continue the uninterrupted run bit for bit.

Durability (:func:`atomic_write`): the new checkpoint is written to a temporary file in
the same folder, flushed and fsync'ed, then renamed over the old one (``os.replace`` is
atomic on POSIX) and the folder is fsync'ed so that the rename itself survives a power
cut. Until the rename the last good checkpoint stays in place, so a run killed while
saving (SIGKILL, OOM killer, power) resumes from it.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import zipfile
from pathlib import Path

import torch

from llmfast.cli import CLIError

CHECKPOINT_NAME = "ckpt.pt"
FORMAT = "llmfast-gpt-1"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):   # some file systems cannot open or fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(f, state) -> None:
    """Serialise ``state`` into the open file ``f`` (a seam: the kill-while-saving test replaces it)."""
    torch.save(state, f)


def atomic_write(path: Path, state) -> None:
    """``torch.save(state, path)`` such that ``path`` is always either the old file or the whole new one."""
    path = Path(path)
    # Same folder as the target: os.replace is only atomic within one file system. The pid
    # keeps two writers (a stray second run) from truncating each other's temporary file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write(f, state)
            f.flush()
            os.fsync(f.fileno())   # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    # Leftovers of writers that were killed mid-save (other pids) are never read: drop them.
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def rng_state() -> dict:
    """Every RNG a training step may draw from: torch (CPU and CUDA), numpy, Python's ``random``.

    Stored as tensors, ints and lists so that a ``weights_only`` load reads them back.
    """
    state = dict(torch=torch.get_rng_state(), python=_plain(random.getstate()))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    return state


def set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):   # checkpoints before the numpy/Python states were kept
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(path: Path, model, opt, rng=None, **progress) -> None:
    """Write model, optimizer, config and RNG states (this process's, unless ``rng`` is given), and
    ``progress`` (step, curve, settings, ...)."""
    state = dict(format=FORMAT, model=model.state_dict(), optimizer=opt.state_dict(),
                 config=model.config.to_dict(), rng=rng_state() if rng is None else rng, **progress)
    atomic_write(path, state)


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path`` (a file, or a run folder holding ``ckpt.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        sharded = list(p.parent.glob("dcp-*/progress.pt")) if p.name == CHECKPOINT_NAME else []
        raise CLIError(f"no checkpoint at {str(p)!r}" + (
            f"; {str(p.parent)!r} holds sharded checkpoints: `llmfast consolidate {p.parent}` writes it"
            if sharded else ""))
    if not zipfile.is_zipfile(p):
        # torch.save writes a zip archive; anything else is a different kind of file,
        # a truncated copy, or a legacy pickle we would have to execute to read.
        raise CLIError(f"cannot read checkpoint {str(p)!r}: not a torch.save file "
                       f"({p.stat().st_size:,} bytes of something else, or a damaged copy)")
    bad = _bad_member(p)
    if bad:
        raise CLIError(f"cannot read checkpoint {str(p)!r}: damaged or incomplete ({bad})")
    try:
        # weights_only: a checkpoint is tensors, numbers, strings and lists; refusing
        # arbitrary pickles means a hostile file cannot run code.
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CLIError(f"cannot read checkpoint {str(p)!r}: it holds Python objects other than tensors, "
                       "numbers and strings, and loading it could run code; not an llmfast train checkpoint") from None
    except Exception as e:  # zip/IO errors all mean the same thing to the user
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot read checkpoint {str(p)!r}: damaged or incomplete ({msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CLIError(f"{str(p)!r} is not an llmfast train checkpoint")
    return state


def _bad_member(p: Path):
    """Why the zip archive at ``p`` is damaged (a record failing its CRC-32, a cut-off file), or None.

    torch.load would not notice a flipped bit inside a tensor's bytes: it would load
    wrong weights. Every zip record carries a CRC-32 of its data; checking them costs one
    read of the file.
    """
    try:
        with zipfile.ZipFile(p) as z:
            name = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return str(e) or type(e).__name__
    return f"record {name!r} fails its CRC-32 check" if name else None


def build_model(config: dict, device):
    """A GPT from a config dict: a new run's settings or a checkpoint's ``config``."""
    from llmfast.models import GPT, GPTConfig

    try:
        cfg = GPTConfig(**config)
    except (TypeError, ValueError) as e:
        raise CLIError(f"invalid model settings: {e}") from None
    return GPT(cfg).to(device)


def restore(ckpt: dict, model, opt=None) -> None:
    """Load the checkpoint's weights into ``model`` (and its optimizer state into ``opt``)."""
    try:
        model.load_state_dict(ckpt["model"])
        if opt is not None:
            opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CLIError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}") from None

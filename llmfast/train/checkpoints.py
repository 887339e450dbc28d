"""Checkpoints: one ``ckpt.pt`` per run, written atomically, read as plain data.

A checkpoint holds the model and optimizer state, the RNG state, the model config and
training settings, the step, the token count and the validation curve so far, and which
corpus it was trained on: everything ``--resume`` needs to continue the same curve.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from llmfast.cli import CLIError

CHECKPOINT_NAME = "ckpt.pt"
FORMAT = "llmfast-gpt-1"


def save_checkpoint(path: Path, model, opt, **progress) -> None:
    """Write model, optimizer, config and RNG state, and ``progress`` (step, curve, settings, ...)."""
    state = dict(format=FORMAT, model=model.state_dict(), optimizer=opt.state_dict(),
                 config=model.config.to_dict(), rng=torch.get_rng_state(), **progress)
    # Write then rename: an interrupted save never leaves a truncated checkpoint behind.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path`` (a file, or a run folder holding ``ckpt.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise CLIError(f"no checkpoint at {str(p)!r}")
    if not zipfile.is_zipfile(p):
        # torch.save writes a zip archive; anything else is a different kind of file,
        # a truncated copy, or a legacy pickle we would have to execute to read.
        raise CLIError(f"cannot read checkpoint {str(p)!r}: not a torch.save file "
                       f"({p.stat().st_size:,} bytes of something else, or a damaged copy)")
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

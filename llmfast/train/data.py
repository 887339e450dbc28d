"""The corpus and its batches: files -> bytes -> uint8 tensor -> (x, y) windows.

Tokens are bytes (vocabulary 256): nothing is downloaded and any text works. The corpus
is split once into a training part and a validation part (the last ``val_fraction`` of
the bytes, after the files are put in a fixed shuffled order). Each training batch is
drawn from a generator seeded by (seed, step), and the validation windows are fixed, so
a resumed run draws exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import math
import random
import sys
import sysconfig
from pathlib import Path

import torch

from llmfast.cli import CLIError

VOCAB_SIZE = 256
DEFAULT_CORPUS_MB = 4.0
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def default_corpus_files() -> list[Path]:
    """The Python standard library's own ``.py`` sources (found from ``sysconfig``)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise CLIError(f"no corpus given and the Python standard library sources are not at {stdlib}; "
                       "name text files or folders with --data")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts))


def corpus_files(paths) -> list[Path]:
    """The files named by ``paths``: files as given, folders as their text files (``TEXT_SUFFIXES``)."""
    files = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CLIError(f"corpus path {raw!r} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise CLIError(f"corpus folder {raw!r} has no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        else:
            files.append(p)
    return files


def load_corpus(paths, max_bytes: int, seed: int) -> tuple[bytes, str]:
    """The corpus bytes (at most ``max_bytes``) and a one-line description of where they came from.

    Files are read in a fixed shuffled order (seeded), so that a size cap and the final
    validation split take a mix of files rather than the alphabetically last ones.
    """
    files = corpus_files(paths) if paths else default_corpus_files()
    where = ", ".join(map(str, paths)) if paths else f"Python {sys.version.split()[0]} stdlib sources"
    random.Random(seed).shuffle(files)
    chunks, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            if paths and len(files) == 1:
                raise CLIError(f"cannot read corpus file {str(f)!r}: {e.strerror or e}") from None
            continue  # one unreadable file among many (a broken link, say) is skipped
        if not data:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1]) + 1
        if total >= max_bytes:
            break
    corpus = b"\n".join(chunks)
    if not corpus:
        raise CLIError(f"the corpus is empty: {where} holds no bytes")
    return corpus, f"{where}: {len(corpus):,} bytes from {len(chunks)} file(s)"


class ByteData:
    """Byte tokens split into train/val; batches are [B, L] windows (inputs) and the next bytes (targets)."""

    def __init__(self, corpus: bytes, block_size: int, val_fraction: float, seed: int):
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        n_val = int(len(data) * val_fraction)
        need = block_size + 2
        if len(data) - n_val < need or n_val < need:
            raise CLIError(f"the corpus is too small: {len(data)} bytes; training with --block-size {block_size} "
                           f"and --val-fraction {val_fraction} needs at least "
                           f"{math.ceil(need / min(val_fraction, 1 - val_fraction))} bytes")
        self.train, self.val = data[: len(data) - n_val], data[len(data) - n_val:]
        self.block_size, self.seed = block_size, seed
        self.rank, self.world = 0, 1
        self.digest = hashlib.sha1(corpus).hexdigest()[:12]

    def shard(self, rank: int, world: int) -> "ByteData":
        """Batches become this rank's rows of the global batch (data-parallel training)."""
        self.rank, self.world = rank, world
        return self

    def _windows(self, data, ix):
        # Every rank draws the whole global batch (cheap: indices) and keeps its own rows, so
        # the global batch is the same for any number of ranks.
        n = len(ix) // self.world
        ix = ix[self.rank * n:(self.rank + 1) * n]
        w = data.unfold(0, self.block_size + 1, 1)[ix].long()   # [B / world, L + 1]
        return w[:, :-1], w[:, 1:]

    def batch(self, step: int, batch_size: int):
        """The training batch of ``step``: the same for a run and its resumption."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        ix = torch.randint(len(self.train) - self.block_size, (batch_size,), generator=g)
        return self._windows(self.train, ix)

    def val_batches(self, n: int, batch_size: int):
        """The same ``n`` validation batches at every evaluation: a smooth, comparable curve."""
        g = torch.Generator().manual_seed(self.seed + 7)
        for _ in range(n):
            ix = torch.randint(len(self.val) - self.block_size, (batch_size,), generator=g)
            yield self._windows(self.val, ix)

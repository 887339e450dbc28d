"""``llmfast train`` and ``llmfast generate``: a byte-level GPT trained on llmfast ops.

    llmfast train                          # the default: Python's own stdlib sources, a few minutes on 2 cores
    llmfast train --data notes/ --steps 2000 --out-dir run1
    llmfast train --out-dir run1 --resume --steps 4000     # continue the same curve
    llmfast train --compare torch,cpu      # tokens/s and peak memory per backend, same model and batches
    llmfast train --nproc 2 --parallel fsdp   # data-parallel (or: torchrun --nproc-per-node 2 -m llmfast train)
    llmfast generate run1 --prompt "def " -n 300

Tokens are bytes (vocabulary 256): nothing is downloaded, any text works. Batches are
a function of (seed, step) and the validation windows are fixed, so a resumed run
continues the curve the uninterrupted run would have drawn.

    data.py         corpus files -> bytes -> train/val split -> (x, y) batches
    loop.py         optimiser, schedule, train_step, evaluate; fit (train) and compare (time backends)
    checkpoints.py  save (atomically) / load ckpt.pt, RNG states, build a model from a config and restore its state
    dist.py         data-parallel runs: launcher, DDP / FSDP2, all-reduced losses, sharded (DCP) checkpoints
    cli.py          the subcommands' options and their runs (llmfast/cli.py calls add_parser and run)
"""
from llmfast.train.checkpoints import load_checkpoint, save_checkpoint
from llmfast.train.cli import COMMANDS, add_parser, run
from llmfast.train.data import ByteData, corpus_files, default_corpus_files, load_corpus
from llmfast.train.loop import compare, evaluate, fit, make_optimizer, train_step

__all__ = ["COMMANDS", "ByteData", "add_parser", "compare", "corpus_files", "default_corpus_files", "evaluate",
           "fit", "load_checkpoint", "load_corpus", "make_optimizer", "run", "save_checkpoint", "train_step"]

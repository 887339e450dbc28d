"""``llmfast train`` and ``llmfast generate``: a byte-level GPT trained on llmfast ops.

    llmfast train                          # the default: Python's own stdlib sources, a few minutes on 2 cores
    llmfast train --data notes/ --steps 2000 --out-dir run1
    llmfast train --out-dir run1 --resume --steps 4000     # continue the same curve
    llmfast train --compare torch,cpu      # tokens/s and peak memory per backend, same model and batches
    llmfast generate run1 --prompt "def " -n 300

Tokens are bytes (vocabulary 256): nothing is downloaded, any text works. The corpus
is split once into a training part and a validation part (the last
``--val-fraction`` of the bytes, after the files are put in a fixed shuffled order).
Each training batch is drawn from a generator seeded by (seed, step), and the
validation windows are fixed, so a resumed run draws exactly the batches the
uninterrupted run would have, and its validation curve continues the same curve.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import pickle
import random
import statistics
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import torch

COMMANDS = ("train", "generate")

CHECKPOINT_NAME = "ckpt.pt"
FORMAT = "llmfast-gpt-1"

# Hyper-parameters, and what a plain `llmfast train` uses. The parser's defaults are None
# so that a resumed run can tell what the user asked for from what the checkpoint says.
MODEL_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, norm="layernorm", pos_embedding="rope",
                      dropout=0.0)
TRAIN_DEFAULTS = dict(steps=300, batch_size=8, optimizer="adamw", lr=3e-3, min_lr=3e-4, warmup=30,
                      weight_decay=0.1, momentum=0.9, grad_clip=1.0, eval_interval=50, eval_batches=8,
                      val_fraction=0.1, seed=1337)
DEFAULT_CORPUS_MB = 4.0
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


class CLIError(Exception):
    """A problem with the user's input: printed as one message, exit status 2."""


# ----------------------------------------------------------------------------------
# Data: files -> bytes -> uint8 tensor -> (x, y) windows


def default_corpus_files() -> list[Path]:
    """The Python standard library's own ``.py`` sources (found from ``sysconfig``)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise CLIError(f"no corpus given and the Python standard library sources are not at {stdlib}; "
                       "name text files or folders with --data")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts))


def corpus_files(paths) -> list[Path]:
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
        self.digest = hashlib.sha1(corpus).hexdigest()[:12]

    def _windows(self, data, ix):
        w = data.unfold(0, self.block_size + 1, 1)[ix].long()   # [B, L + 1]
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


# ----------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    # Write then rename: an interrupted save never leaves a truncated checkpoint behind.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
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


def _build_model(config_dict: dict, device):
    from llmfast.models import GPT, GPTConfig

    try:
        config = GPTConfig(**config_dict)
    except (TypeError, ValueError) as e:
        raise CLIError(f"invalid model settings: {e}") from None
    return GPT(config).to(device)


# ----------------------------------------------------------------------------------
# Training


def _lr_at(step: int, h: dict) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    frac = (step - h["warmup"]) / max(1, h["steps"] - h["warmup"])
    return h["min_lr"] + 0.5 * (h["lr"] - h["min_lr"]) * (1 + math.cos(math.pi * min(1.0, frac)))


def _make_optimizer(model, h: dict):
    # Weight decay on matrices only (linear weights, the tied embedding), not on biases and
    # norm weights: decaying a norm's gain towards 0 just fights the norm.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=h["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel per parameter group instead of ~10 elementwise ops per parameter
    # (on CPU torch otherwise loops over parameters one by one).
    if h["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=h["lr"], betas=(0.9, 0.95), fused=True)
    return torch.optim.SGD(groups, lr=h["lr"], momentum=h["momentum"], fused=True)


def _autocast(device, name):
    if name in (None, "none"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name])


@torch.no_grad()
def evaluate(model, data: ByteData, h: dict, device, autocast) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for x, y in data.val_batches(h["eval_batches"], h["batch_size"]):
        with _autocast(device, autocast):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was)
    return total / h["eval_batches"]


def _train_step(model, opt, data, step, h, device, autocast):
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, h)
    x, y = data.batch(step, h["batch_size"])
    with _autocast(device, autocast):
        _, loss = model(x.to(device), y.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if h["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["grad_clip"])
    opt.step()
    return loss


def _resolve_settings(args, ckpt):
    """Model and training settings: the command line, else the checkpoint, else the defaults."""
    old_model = ckpt["config"] if ckpt else {}
    old_train = ckpt["train"] if ckpt else {}
    model = {}
    for k, default in MODEL_DEFAULTS.items():
        given = getattr(args, k)
        if ckpt is not None and given is not None and given != old_model.get(k):
            raise CLIError(f"--{k.replace('_', '-')} {given} differs from the checkpoint's {old_model.get(k)}; "
                           "a resumed run keeps the model it was trained with")
        model[k] = given if given is not None else old_model.get(k, default)
    if ckpt:
        model = dict(old_model, **model)
    train = {}
    for k, default in TRAIN_DEFAULTS.items():
        given = getattr(args, k)
        train[k] = given if given is not None else old_train.get(k, default)
    if ckpt and train["optimizer"] != old_train.get("optimizer"):
        raise CLIError(f"--optimizer {train['optimizer']} differs from the checkpoint's {old_train.get('optimizer')}")
    for k in ("steps", "batch_size", "eval_interval", "eval_batches"):
        if train[k] <= 0:
            raise CLIError(f"--{k.replace('_', '-')} must be positive, got {train[k]}")
    if not 0 < train["val_fraction"] < 1:
        raise CLIError(f"--val-fraction must be between 0 and 1, got {train['val_fraction']}")
    if train["warmup"] < 0 or train["lr"] <= 0:
        raise CLIError("--warmup must be >= 0 and --lr > 0")
    return model, train


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _peak_rss_mb() -> float | None:
    try:
        return _vm_kb("VmHWM:") / 1024
    except OSError:
        return None


def _ppl(mean_loss: float) -> float:
    import llmfast

    return float(llmfast.perplexity(torch.tensor(mean_loss)))


def _fmt_curve(curve) -> str:
    lines = [f"{'step':>7} {'tokens':>11} {'train loss':>11} {'val loss':>9} {'val ppl':>9}"]
    for c in curve:
        train = "-" if c["train_loss"] is None else f"{c['train_loss']:.4f}"
        lines.append(f"{c['step']:>7} {c['tokens']:>11,} {train:>11} {c['val_loss']:>9.4f} {c['val_ppl']:>9.3f}")
    return "\n".join(lines)


def _set_threads(requested, device) -> str:
    """Set torch's CPU threads; returns a note for the header.

    Without --threads, a machine that is already busy (1-minute load average at or above its
    core count) trains on one thread: OpenMP's barriers across cores that other processes
    hold make every small op of a small model wait, and measured here (2 cores, load ~4) one
    thread ran a step about 4x faster than two.
    """
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} thread(s)"
    if device.type != "cpu":
        return f"{torch.get_num_threads()} CPU thread(s)"
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return f"{torch.get_num_threads()} thread(s)"
    if cores > 1 and load >= cores:
        torch.set_num_threads(1)
        return f"1 thread (this machine is busy: load {load:.1f} on {cores} cores; --threads N overrides)"
    return f"{torch.get_num_threads()} thread(s)"


def cmd_train(args) -> int:
    import llmfast

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda, but no CUDA GPU is visible")
    threads_note = _set_threads(args.threads, device)
    out_dir = Path(args.out_dir).expanduser()
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(ckpt_path if args.resume == "auto" else args.resume)
    model_cfg, h = _resolve_settings(args, ckpt)
    if args.compare:
        return _compare(args, model_cfg, h, device, threads_note)

    if ckpt and args.data is None:  # a resumed run reads the corpus it was trained on
        args.data, args.corpus_mb = ckpt.get("data"), ckpt.get("corpus_mb", args.corpus_mb)
    corpus, where = load_corpus(args.data, int(args.corpus_mb * 2**20), h["seed"])
    data = ByteData(corpus, model_cfg["block_size"], h["val_fraction"], h["seed"])
    if ckpt and ckpt.get("corpus") != data.digest:
        print(f"llmfast train: note: the corpus differs from the one this checkpoint was trained on "
              f"(sha1 {data.digest} vs {ckpt.get('corpus')}); the curve will not continue exactly", file=sys.stderr)
    torch.manual_seed(h["seed"])
    model_cfg["vocab_size"] = 256
    model = _build_model(model_cfg, device)
    opt = _make_optimizer(model, h)
    start, curve, tokens = 0, [], 0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CLIError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}") from None
        start, curve, tokens = ckpt["step"], list(ckpt["curve"]), ckpt["tokens"]
        torch.set_rng_state(ckpt["rng"])
    if start >= h["steps"]:
        print(f"llmfast train: the checkpoint is at step {start}, which is already --steps {h['steps']}; "
              "nothing to do (raise --steps to continue)")
        print(_fmt_curve(curve))
        return 0
    train_model = torch.compile(model) if args.compile else model
    tok_per_step = h["batch_size"] * model_cfg["block_size"]
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"llmfast train: {where}; train {len(data.train):,} / val {len(data.val):,} bytes")
    print(f"model: GPT {model.num_params() / 1e6:.2f}M params ({model_cfg['n_layer']} layers, "
          f"{model_cfg['n_head']} heads, {model_cfg['n_embd']} wide, context {model_cfg['block_size']}, "
          f"{model_cfg['norm']}, {model_cfg['pos_embedding']} positions); device {device}; "
          f"{threads_note}; llmfast backend {args.backend}{'; torch.compile' if args.compile else ''}"
          f"{'; autocast ' + args.autocast if args.autocast else ''}")
    print(f"optimizer: {h['optimizer']} lr {h['lr']:g} -> {h['min_lr']:g} (warm-up {h['warmup']}), "
          f"batch {h['batch_size']} x {model_cfg['block_size']} = {tok_per_step:,} tokens/step, "
          f"steps {start} -> {h['steps']}" + (f" (resumed from {ckpt_path})" if ckpt else ""))

    def checkpoint(step):
        save_checkpoint(ckpt_path, dict(format=FORMAT, model=model.state_dict(), optimizer=opt.state_dict(),
                                        config=model.config.to_dict(), train=h, step=step, tokens=tokens,
                                        curve=curve, rng=torch.get_rng_state(), corpus=data.digest,
                                        data=[str(Path(p).resolve()) for p in args.data] if args.data else None,
                                        corpus_mb=args.corpus_mb))

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; progress is still printed at each evaluation
        tqdm = None
    bar = tqdm(total=h["steps"], initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=args.quiet) if tqdm else None
    say = bar.write if bar else print
    with llmfast.backend(args.backend):
        if not curve:  # the curve starts at the untrained model
            v = evaluate(model, data, h, device, args.autocast)
            curve.append(dict(step=0, tokens=0, train_loss=None, val_loss=v, val_ppl=_ppl(v)))
            say(f"step {0:>6} | val loss {v:.4f} | val ppl {_ppl(v):8.3f}")
        model.train()
        t_train, n_train, recent = 0.0, 0, []
        win_t, win_tok = time.perf_counter(), 0
        for step in range(start, h["steps"]):
            t0 = time.perf_counter()
            loss = _train_step(train_model, opt, data, step, h, device, args.autocast)
            loss_v = loss.item()   # syncs, so the timing below is the step's
            dt = time.perf_counter() - t0
            if not math.isfinite(loss_v):
                raise CLIError(f"the loss became {loss_v} at step {step + 1}; lower --lr or set --grad-clip")
            tokens += tok_per_step
            t_train += dt
            n_train += 1
            win_tok += tok_per_step
            recent = (recent + [loss_v])[-h["eval_interval"]:]
            if bar:
                now = time.perf_counter()
                bar.set_postfix_str(f"loss {loss_v:.4f}, {win_tok / max(now - win_t, 1e-9):,.0f} tok/s")
                if now - win_t > 5:
                    win_t, win_tok = now, 0
                bar.update()
            done = step + 1
            if done % h["eval_interval"] == 0 or done == h["steps"]:
                v = evaluate(model, data, h, device, args.autocast)
                train_loss = sum(recent) / len(recent)
                curve.append(dict(step=done, tokens=tokens, train_loss=train_loss, val_loss=v, val_ppl=_ppl(v)))
                say(f"step {done:>6} | train loss {train_loss:.4f} | val loss {v:.4f} | "
                    f"val ppl {_ppl(v):8.3f} | {tok_per_step * n_train / max(t_train, 1e-9):,.0f} tok/s")
                checkpoint(done)
    if bar:
        bar.close()
    print("\nvalidation curve:")
    print(_fmt_curve(curve))
    peak = _peak_rss_mb()
    print(f"\n{n_train} steps in {t_train:.1f} s of training: {tok_per_step * n_train / max(t_train, 1e-9):,.0f} "
          f"tokens/s" + (f"; peak resident memory {peak:,.0f} MB" if peak else ""))
    print(f"val perplexity {curve[0]['val_ppl']:.2f} -> {curve[-1]['val_ppl']:.2f}; checkpoint {ckpt_path}")
    return 0


# ----------------------------------------------------------------------------------
# --compare: tokens/s and peak memory per backend, one process, same model and batches


def _steady_state_malloc() -> None:
    """Undo, for timing, the allocator setting peak_memory_mb needs.

    For a faithful high-water mark peak_memory_mb fixes glibc's mmap threshold at 64 KiB, so
    every activation is a fresh mmap and munmap (page faults on each step: a third of the
    step time here). By default glibc raises that threshold to the largest block freed so
    far (at most 32 MiB on 64-bit) and keeps the heap, so a training loop reuses warm memory;
    setting 32 MiB / 64 MiB trim restores that steady state.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 << 20)   # M_TRIM_THRESHOLD


def _compare(args, model_cfg, h, device, threads_note) -> int:
    import llmfast
    from llmfast.bench import peak_memory_mb

    names = [b.strip() for b in args.compare.split(",") if b.strip()]
    for b in names:
        if b not in llmfast.backends._CHOICES:
            raise CLIError(f"--compare: unknown backend {b!r}; expected some of {llmfast.backends._CHOICES}")
    corpus, where = load_corpus(args.data, int(args.corpus_mb * 2**20), h["seed"])
    data = ByteData(corpus, model_cfg["block_size"], h["val_fraction"], h["seed"])
    model_cfg = dict(model_cfg, vocab_size=256)
    steps = min(h["steps"], args.compare_steps)
    tok_per_step = h["batch_size"] * model_cfg["block_size"]
    print(f"llmfast train --compare: {where}; GPT {model_cfg}; batch {h['batch_size']} x {model_cfg['block_size']}; "
          f"{args.compare_rounds} x {steps} timed steps per backend; {threads_note}"
          f"{'; torch.compile' if args.compile else ''}")
    # peak_memory_mb makes glibc return freed blocks to the OS at once (mallopt) on its first
    # call; a heap grown before that keeps freed pages resident, and later steps reuse them
    # without raising the high-water mark. Set that up before any step runs.
    peak_memory_mb(lambda: None, device.type)
    runs = []
    for name in dict.fromkeys(names):
        torch.manual_seed(h["seed"])   # the same initial weights, and the same batches, for every backend
        model = _build_model(model_cfg, device)
        runs.append(dict(name=name, model=model, opt=_make_optimizer(model, h), step=0, tps=[],
                         run=torch.compile(model) if args.compile else model))

    def train_steps(r, n):
        for _ in range(n):
            loss = _train_step(r["run"], r["opt"], data, r["step"], h, device, args.autocast)
            r["loss"] = loss.item()
            r["step"] += 1

    for r in runs:
        with llmfast.backend(r["name"]):
            train_steps(r, 2)   # warm-up (and compilation)
            r["peak"] = peak_memory_mb(lambda: train_steps(r, 2), device.type)
    _steady_state_malloc()
    # Timing rounds alternate the backends, so that a machine whose load changes (other jobs
    # on a shared box) slows each of them alike; the median round is reported.
    for _ in range(args.compare_rounds):
        for r in runs:
            with llmfast.backend(r["name"]):
                t0 = time.perf_counter()
                train_steps(r, steps)
                r["tps"].append(tok_per_step * steps / (time.perf_counter() - t0))
    base = runs[0]
    med = {r["name"]: statistics.median(r["tps"]) for r in runs}
    print(f"\n{'backend':<9}{'tokens/s':>11}{'(min-max)':>17}{'vs ' + base['name']:>10}{'peak MB':>10}"
          f"{'vs ' + base['name']:>10}{'loss':>9}")
    for r in runs:
        mem = "-" if r["peak"] is None else f"{r['peak']:.1f}"
        mem_ratio = "-" if (r["peak"] is None or not base["peak"]) else f"{r['peak'] / base['peak']:.2f}x"
        spread = f"{min(r['tps']):,.0f}-{max(r['tps']):,.0f}"
        print(f"{r['name']:<9}{med[r['name']]:>11,.0f}{spread:>17}{med[r['name']] / med[base['name']]:>9.2f}x"
              f"{mem:>10}{mem_ratio:>10}{r['loss']:>9.4f}")
    print(f"\ntokens/s: median of {args.compare_rounds} alternating rounds of {steps} steps; peak MB: the training "
          "steps' peak resident memory above what was resident before them (VmHWM, as "
          "llmfast.bench.peak_memory_mb measures it); loss: after the same steps on the same batches")
    return 0


# ----------------------------------------------------------------------------------
# generate


def cmd_generate(args) -> int:
    import llmfast

    ckpt = load_checkpoint(args.checkpoint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _build_model(ckpt["config"], device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CLIError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}") from None
    if args.max_new_tokens < 0:
        raise CLIError("--max-new-tokens must be >= 0")
    if args.top_k is not None and args.top_k <= 0:
        raise CLIError("--top-k must be positive")
    if args.temperature < 0:
        raise CLIError("--temperature must be >= 0")
    prompt = args.prompt.encode("utf-8") or b"\n"
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with llmfast.backend(args.backend):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return 0


# ----------------------------------------------------------------------------------
# CLI glue (llmfast/cli.py calls add_parser and run)


def add_parser(subparsers) -> None:
    from llmfast.backends import _CHOICES

    t = subparsers.add_parser("train", help="train a small byte-level GPT on llmfast ops (default: Python's stdlib)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = t.add_argument_group("data")
    d.add_argument("--data", action="append", metavar="PATH",
                   help="text file or folder (repeatable); default: the Python standard library's .py sources")
    d.add_argument("--corpus-mb", type=float, default=DEFAULT_CORPUS_MB, help="read at most this many MB")
    # (a resumed run reuses the checkpoint's --data and --corpus-mb unless --data is given)
    d.add_argument("--val-fraction", type=float, help=f"held-out share of the bytes "
                                                      f"(default {TRAIN_DEFAULTS['val_fraction']})")
    m = t.add_argument_group("model (fixed by the checkpoint when resuming)")
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        m.add_argument("--" + k.replace("_", "-"), type=int, help=f"default {MODEL_DEFAULTS[k]}")
    m.add_argument("--norm", choices=("layernorm", "rmsnorm"), help="default layernorm")
    m.add_argument("--pos-embedding", choices=("learned", "rope"), help="default rope")
    m.add_argument("--dropout", type=float, help="default 0")
    o = t.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help=f"train until this step (default {TRAIN_DEFAULTS['steps']})")
    o.add_argument("--batch-size", type=int, help=f"default {TRAIN_DEFAULTS['batch_size']}")
    o.add_argument("--optimizer", choices=("adamw", "sgd"), help="default adamw")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default {TRAIN_DEFAULTS['lr']})")
    o.add_argument("--min-lr", type=float, help=f"cosine floor (default {TRAIN_DEFAULTS['min_lr']})")
    o.add_argument("--warmup", type=int, help=f"warm-up steps (default {TRAIN_DEFAULTS['warmup']})")
    o.add_argument("--weight-decay", type=float, help=f"AdamW/SGD decay of matrices "
                                                      f"(default {TRAIN_DEFAULTS['weight_decay']})")
    o.add_argument("--momentum", type=float, help=f"SGD momentum (default {TRAIN_DEFAULTS['momentum']})")
    o.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default {TRAIN_DEFAULTS['grad_clip']})")
    o.add_argument("--seed", type=int, help=f"default {TRAIN_DEFAULTS['seed']}")
    e = t.add_argument_group("evaluation and checkpoints")
    e.add_argument("--eval-interval", type=int, help=f"steps between validations and checkpoints "
                                                     f"(default {TRAIN_DEFAULTS['eval_interval']})")
    e.add_argument("--eval-batches", type=int, help=f"validation batches (default {TRAIN_DEFAULTS['eval_batches']})")
    e.add_argument("--out-dir", default="llmfast-run", help="where ckpt.pt goes")
    e.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (default: OUT_DIR/ckpt.pt)")
    r = t.add_argument_group("run")
    r.add_argument("--backend", default="auto", choices=_CHOICES, help="llmfast backend for every op")
    r.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed precision")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, or 1 when the machine is "
                                               "already busy)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--compare", metavar="BACKENDS",
                   help="comma-separated backends (e.g. torch,cpu): time training steps and measure peak memory "
                        "with each, in this one process, instead of training")
    r.add_argument("--compare-steps", type=int, default=5, help="timed steps per backend and round for --compare")
    r.add_argument("--compare-rounds", type=int, default=4, help="alternating timing rounds for --compare")

    g = subparsers.add_parser("generate", help="sample text from an `llmfast train` checkpoint",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("checkpoint", nargs="?", default="llmfast-run", help="checkpoint file or the run's --out-dir")
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("-n", "--max-new-tokens", type=int, default=200, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", choices=_CHOICES)
    g.add_argument("--device", help="cpu or cuda (default: cuda when visible)")


def run(args) -> int:
    from llmfast.backends import BackendUnavailableError

    try:
        return cmd_train(args) if args.cmd == "train" else cmd_generate(args)
    except (CLIError, BackendUnavailableError) as e:
        print(f"llmfast {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nllmfast {args.cmd}: interrupted" + (" (the last checkpoint is kept)" if args.cmd == "train" else ""),
              file=sys.stderr)
        return 130

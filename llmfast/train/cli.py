"""``llmfast train`` and ``llmfast generate``: their options, and the runs they start.

llmfast/cli.py adds these subcommands with :func:`add_parser` and hands the parsed
arguments of a command in :data:`COMMANDS` to :func:`run`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from llmfast.cli import CLIError, add_backend_argument, add_device_argument, resolve_device
from llmfast.train import dist as dist_train
from llmfast.train import loop
from llmfast.train.checkpoints import CHECKPOINT_NAME, build_model, load_checkpoint, restore, set_rng_state
from llmfast.train.data import DEFAULT_CORPUS_MB, VOCAB_SIZE, ByteData, load_corpus

COMMANDS = ("train", "generate", "consolidate")

# Hyper-parameters, and what a plain `llmfast train` uses. A resumed run keeps the
# checkpoint's value of each one that the command line does not give.
MODEL_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, norm="layernorm", pos_embedding="rope",
                      dropout=0.0)
TRAIN_DEFAULTS = dict(steps=300, batch_size=8, optimizer="adamw", lr=3e-3, min_lr=3e-4, warmup=30,
                      weight_decay=0.1, momentum=0.9, grad_clip=1.0, eval_interval=50, eval_batches=8,
                      val_fraction=0.1, seed=1337)


class _Given(argparse.Action):
    """Store the value and record that the option was given (in ``args.given``).

    The parser's defaults are the real ones, so that --help shows them; a resumed run
    needs to tell an option the user gave from a default, even one given at its default.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = namespace.given | {self.dest}


def _setting(group, key, defaults, help, **kw):
    group.add_argument("--" + key.replace("_", "-"), default=defaults[key], action=_Given, help=help, **kw)


def _resolve_settings(args, ckpt):
    """Model and training settings: the command line, else the checkpoint, else the defaults."""
    old_model = ckpt["config"] if ckpt else {}
    old_train = ckpt["train"] if ckpt else {}

    def pick(k, old):
        return getattr(args, k) if k in args.given or k not in old else old[k]

    for k in MODEL_DEFAULTS:
        if ckpt and k in args.given and getattr(args, k) != old_model.get(k):
            raise CLIError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                           f"{old_model.get(k)}; a resumed run keeps the model it was trained with")
    model = dict(old_model, **{k: pick(k, old_model) for k in MODEL_DEFAULTS}, vocab_size=VOCAB_SIZE)
    train = {k: pick(k, old_train) for k in TRAIN_DEFAULTS}
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


def _corpus(args, ckpt, h):
    """The corpus bytes and where they came from; a resumed run reads the one it was trained on."""
    data, corpus_mb = args.data, args.corpus_mb
    if ckpt and data is None:
        data = ckpt.get("data")
    if ckpt and "corpus_mb" not in args.given:
        corpus_mb = ckpt.get("corpus_mb", corpus_mb)
    corpus, where = load_corpus(data, int(corpus_mb * 2**20), h["seed"])
    # Absolute paths: the checkpoint's --resume may run from another folder.
    meta = dict(data=[str(Path(p).resolve()) for p in data] if data else None, corpus_mb=corpus_mb)
    return corpus, where, meta


def _resume_from(args, out_dir):
    if not args.resume:
        return None
    p = out_dir if args.resume == "auto" else Path(args.resume).expanduser()
    # a run folder: the newest of its ckpt.pt and its sharded checkpoints
    return dist_train.latest(p) if p.is_dir() else load_checkpoint(p)


def cmd_train(args) -> int:
    """One process's run; under torchrun (WORLD_SIZE > 1) one rank's, with --nproc the launcher's."""
    if args.nproc is not None and args.nproc < 1:
        raise CLIError(f"--nproc must be positive, got {args.nproc}")
    if args.nproc and args.nproc > 1:
        return dist_train.launch(args, args.nproc)
    rank, world, _ = dist_train.world()
    if world == 1:
        return _train(args, resolve_device(args.device), rank, world)
    if args.dist_timeout <= 0:
        raise CLIError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    device = dist_train.init(resolve_device(args.device), args.dist_timeout)
    try:
        with dist_train.quiet_unless_rank0():
            return _train(args, device, rank, world)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args, device, rank: int, world: int) -> int:
    import llmfast
    from llmfast.bench import peak_rss_mb

    threads_note = _set_threads(args.threads, device)
    out_dir = Path(args.out_dir).expanduser()
    ckpt_path = out_dir / CHECKPOINT_NAME
    ckpt = _resume_from(args, out_dir)
    model_cfg, h = _resolve_settings(args, ckpt)
    if h["batch_size"] % world:
        raise CLIError(f"--batch-size {h['batch_size']} must be a multiple of the number of processes ({world}): "
                       "each rank trains on an equal share of the global batch")
    corpus, where, meta = _corpus(args, ckpt, h)
    data = ByteData(corpus, model_cfg["block_size"], h["val_fraction"], h["seed"]).shard(rank, world)
    if args.compare:
        return _compare(args, model_cfg, h, data, where, device, threads_note)
    if ckpt and ckpt.get("corpus") != data.digest:
        print(f"llmfast train: note: the corpus differs from the one this checkpoint was trained on "
              f"(sha1 {data.digest} vs {ckpt.get('corpus')}); the curve will not continue exactly", file=sys.stderr)
    torch.manual_seed(h["seed"])
    model = build_model(model_cfg, device)
    if ckpt and "sharded" not in ckpt and world > 1:
        if args.parallel == "fsdp":
            raise CLIError(f"an FSDP run resumes from a sharded checkpoint; {ckpt_path} is a single file "
                           "(resume it on one process or with --parallel ddp)")
        restore(ckpt, model)   # before DDP wraps it: DDP starts from rank 0's weights
    if world > 1:
        model = dist_train.wrap(model, args.parallel, device)
    opt = loop.make_optimizer(model, h)
    start, curve, tokens, losses = 0, [], 0, []
    if ckpt:
        if "sharded" in ckpt:
            dist_train.load(ckpt["sharded"], model, opt)
        else:
            restore(ckpt, model.module if world > 1 else model, opt)
        start, curve, tokens, losses = ckpt["step"], list(ckpt["curve"]), ckpt["tokens"], list(ckpt.get("losses", []))
        set_rng_state(ckpt["rng"])
    if start >= h["steps"]:
        print(f"llmfast train: the checkpoint is at step {start}, which is already --steps {h['steps']}; "
              "nothing to do (raise --steps to continue)")
        print(loop.format_curve(curve))
        return 0
    tok_per_step = h["batch_size"] * model_cfg["block_size"]
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"llmfast train: {where}; train {len(data.train):,} / val {len(data.val):,} bytes")
    gpt = getattr(model, "module", model)
    print(f"model: GPT {gpt.num_params() / 1e6:.2f}M params ({model_cfg['n_layer']} layers, "
          f"{model_cfg['n_head']} heads, {model_cfg['n_embd']} wide, context {model_cfg['block_size']}, "
          f"{model_cfg['norm']}, {model_cfg['pos_embedding']} positions); device {device}; "
          f"{threads_note}; llmfast backend {args.backend}{'; torch.compile' if args.compile else ''}"
          f"{'; autocast ' + args.autocast if args.autocast else ''}"
          + (f"; {world} processes, {args.parallel.upper()} over {torch.distributed.get_backend()}" if world > 1 else ""))
    print(f"optimizer: {h['optimizer']} lr {h['lr']:g} -> {h['min_lr']:g} (warm-up {h['warmup']}), "
          f"batch {h['batch_size']} x {model_cfg['block_size']} = {tok_per_step:,} tokens/step, "
          f"steps {start} -> {h['steps']}" + (f" (resumed from {ckpt.get('sharded', ckpt_path)})" if ckpt else ""))
    parallel = {}
    if world > 1:
        parallel = dict(save=lambda step, progress: dist_train.save(out_dir, model, opt, step, progress),
                        reduce=lambda x: dist_train.mean(x, device))
    with llmfast.backend(args.backend):
        n_train, t_train = loop.fit(model, opt, data, h, device, ckpt_path=ckpt_path,
                                    meta=dict(meta, corpus=data.digest), start=start, curve=curve, tokens=tokens,
                                    losses=losses, **parallel,
                                    autocast=args.autocast, compile=args.compile, quiet=args.quiet)
    if world > 1:   # one file for `llmfast generate`: gathered from the last sharded checkpoint
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank == 0:
            dist_train.consolidate(out_dir)
    print("\nvalidation curve:")
    print(loop.format_curve(curve))
    peak = peak_rss_mb()
    print(f"\n{n_train} steps in {t_train:.1f} s of training: {tok_per_step * n_train / max(t_train, 1e-9):,.0f} "
          f"tokens/s" + (f"; peak resident memory {peak:,.0f} MB" if peak else ""))
    print(f"val perplexity {curve[0]['val_ppl']:.2f} -> {curve[-1]['val_ppl']:.2f}; checkpoint {ckpt_path}")
    return 0


def _compare(args, model_cfg, h, data, where, device, threads_note) -> int:
    from llmfast.backends import BACKENDS

    names = [b.strip() for b in args.compare.split(",") if b.strip()]
    for b in names:
        if b not in ("auto", *BACKENDS):
            raise CLIError(f"--compare: unknown backend {b!r}; expected some of {('auto', *BACKENDS)}")
    steps = min(h["steps"], args.compare_steps)
    print(f"llmfast train --compare: {where}; GPT {model_cfg}; batch {h['batch_size']} x {model_cfg['block_size']}; "
          f"{args.compare_rounds} x {steps} timed steps per backend; {threads_note}"
          f"{'; torch.compile' if args.compile else ''}")
    runs = loop.compare(names, model_cfg, h, data, device, steps=steps, rounds=args.compare_rounds,
                        autocast=args.autocast, compile=args.compile)
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
    print(f"\ntokens/s: median of {args.compare_rounds} alternating rounds of {steps} steps (llmfast.bench."
          "time_interleaved); peak MB: the training steps' peak resident memory above what was resident before "
          "them (llmfast.bench.peak_memory_mb); loss: after the same steps on the same batches")
    return 0


def cmd_generate(args) -> int:
    import llmfast

    ckpt = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = build_model(ckpt["config"], device)
    restore(ckpt, model)
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
        t0 = time.perf_counter()
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g,
                             use_cache=not args.no_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    # the speed goes to stderr: stdout stays the generated text
    sys.stderr.write(f"{args.max_new_tokens} tokens in {dt:.3f} s: {args.max_new_tokens / max(dt, 1e-9):.1f} tokens/s "
                     f"(KV cache {'off' if args.no_cache else 'on'})\n")
    return 0


def add_parser(subparsers) -> None:
    import llmfast.train

    t = subparsers.add_parser("train", help="train a small byte-level GPT on llmfast ops (default: Python's stdlib)",
                              description=llmfast.train.__doc__.split("\n\n")[0])
    t.set_defaults(given=frozenset())
    d = t.add_argument_group("data (a resumed run reads its checkpoint's unless --data is given)")
    d.add_argument("--data", action="append", metavar="PATH",
                   help="text file or folder, repeatable (default: the Python standard library's .py sources)")
    d.add_argument("--corpus-mb", type=float, default=DEFAULT_CORPUS_MB, action=_Given,
                   help="read at most this many MB")
    _setting(d, "val_fraction", TRAIN_DEFAULTS, "held-out share of the bytes", type=float)
    m = t.add_argument_group("model (fixed by the checkpoint when resuming)")
    _setting(m, "n_layer", MODEL_DEFAULTS, "transformer blocks", type=int)
    _setting(m, "n_head", MODEL_DEFAULTS, "attention heads", type=int)
    _setting(m, "n_embd", MODEL_DEFAULTS, "width", type=int)
    _setting(m, "block_size", MODEL_DEFAULTS, "context length in bytes", type=int)
    _setting(m, "norm", MODEL_DEFAULTS, "normalisation layers", choices=("layernorm", "rmsnorm"))
    _setting(m, "pos_embedding", MODEL_DEFAULTS, "position encoding", choices=("learned", "rope"))
    _setting(m, "dropout", MODEL_DEFAULTS, "dropout probability", type=float)
    o = t.add_argument_group("optimisation (the checkpoint's when resuming, unless given)")
    _setting(o, "steps", TRAIN_DEFAULTS, "train until this step", type=int)
    _setting(o, "batch_size", TRAIN_DEFAULTS, "sequences per step", type=int)
    _setting(o, "optimizer", TRAIN_DEFAULTS, "fixed by the checkpoint when resuming", choices=("adamw", "sgd"))
    _setting(o, "lr", TRAIN_DEFAULTS, "peak learning rate", type=float)
    _setting(o, "min_lr", TRAIN_DEFAULTS, "cosine floor", type=float)
    _setting(o, "warmup", TRAIN_DEFAULTS, "warm-up steps", type=int)
    _setting(o, "weight_decay", TRAIN_DEFAULTS, "AdamW/SGD decay of matrices", type=float)
    _setting(o, "momentum", TRAIN_DEFAULTS, "SGD momentum", type=float)
    _setting(o, "grad_clip", TRAIN_DEFAULTS, "max gradient norm, 0 = off", type=float)
    _setting(o, "seed", TRAIN_DEFAULTS, "initial weights and batches", type=int)
    e = t.add_argument_group("evaluation and checkpoints")
    _setting(e, "eval_interval", TRAIN_DEFAULTS, "steps between validations and checkpoints", type=int)
    _setting(e, "eval_batches", TRAIN_DEFAULTS, "validation batches", type=int)
    e.add_argument("--out-dir", default="llmfast-run", help="where ckpt.pt goes")
    e.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT, or from OUT_DIR/ckpt.pt when CKPT is left out")
    r = t.add_argument_group("run")
    add_backend_argument(r)
    add_device_argument(r)
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    p = t.add_argument_group("data-parallel (llmfast/train/dist.py; also under torchrun -m llmfast train)")
    p.add_argument("--nproc", type=int, help="start N local processes (torch's elastic launcher, as torchrun)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="DistributedDataParallel, or FSDP2 fully_shard (parameters, gradients and optimizer "
                        "state sharded)")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="process-group timeout: a rank that stops makes the others fail after this long")
    r.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed precision (default: off)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, or 1 when the machine is "
                                               "already busy)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    r.add_argument("--compare", metavar="BACKENDS",
                   help="comma-separated backends (e.g. torch,cpu): time training steps and measure peak memory "
                        "with each, in this one process, instead of training")
    r.add_argument("--compare-steps", type=int, default=5, help="timed steps per backend and round for --compare")
    r.add_argument("--compare-rounds", type=int, default=4, help="alternating timing rounds for --compare")

    g = subparsers.add_parser("generate", help="sample text from an `llmfast train` checkpoint")
    g.add_argument("checkpoint", nargs="?", default="llmfast-run", help="checkpoint file or the run's --out-dir")
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("-n", "--max-new-tokens", type=int, default=200, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context for every token (no KV cache; for comparison)")
    add_backend_argument(g)
    add_device_argument(g)

    c = subparsers.add_parser("consolidate", help="write a run's newest sharded checkpoint (dcp-*/) as OUT_DIR/ckpt.pt")
    c.add_argument("run", help="the run's --out-dir")


def run(args) -> int:
    try:
        if args.cmd == "consolidate":
            print(f"llmfast consolidate: wrote {dist_train.consolidate(Path(args.run).expanduser())}")
            return 0
        return cmd_train(args) if args.cmd == "train" else cmd_generate(args)
    except KeyboardInterrupt:
        print(f"\nllmfast {args.cmd}: interrupted" + (" (the last checkpoint is kept)" if args.cmd == "train" else ""),
              file=sys.stderr)
        return 130

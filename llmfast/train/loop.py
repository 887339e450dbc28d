"""The training loop: optimiser, learning-rate schedule, one step, evaluation, and two
drivers: :func:`fit` (train, evaluate, checkpoint) and :func:`compare` (tokens/s and
peak memory per backend on the same model and batches).

``h`` is the dict of training settings (``llmfast.train.cli.TRAIN_DEFAULTS`` has the keys).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from llmfast.cli import CLIError, Progress
from llmfast.train.checkpoints import build_model, save_checkpoint
from llmfast.train.data import ByteData


def lr_at(step: int, h: dict) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    frac = (step - h["warmup"]) / max(1, h["steps"] - h["warmup"])
    return h["min_lr"] + 0.5 * (h["lr"] - h["min_lr"]) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(model, h: dict):
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
def evaluate(model, data: ByteData, h: dict, device, autocast, reduce=None) -> float:
    """Mean loss over the fixed validation batches (``reduce``: the mean over ranks, when data-parallel)."""
    was = model.training
    model.eval()
    total = 0.0
    for x, y in data.val_batches(h["eval_batches"], h["batch_size"]):
        with _autocast(device, autocast):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was)
    total /= h["eval_batches"]
    return total if reduce is None else reduce(total)


def train_step(model, opt, data: ByteData, step: int, h: dict, device, autocast):
    """One optimiser step on the batch of ``step``; returns the loss (a tensor: no sync here)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, h)
    x, y = data.batch(step, h["batch_size"])
    with _autocast(device, autocast):
        _, loss = model(x.to(device), y.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if h["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["grad_clip"])
    opt.step()
    return loss


def perplexity(mean_loss: float) -> float:
    import llmfast

    return float(llmfast.perplexity(torch.tensor(mean_loss)))


def format_curve(curve) -> str:
    lines = [f"{'step':>7} {'tokens':>11} {'train loss':>11} {'val loss':>9} {'val ppl':>9}"]
    for c in curve:
        train = "-" if c["train_loss"] is None else f"{c['train_loss']:.4f}"
        lines.append(f"{c['step']:>7} {c['tokens']:>11,} {train:>11} {c['val_loss']:>9.4f} {c['val_ppl']:>9.3f}")
    return "\n".join(lines)


def _eval_point(model, data, h, device, autocast, step, tokens, train_loss, reduce=None) -> dict:
    v = evaluate(model, data, h, device, autocast, reduce)
    return dict(step=step, tokens=tokens, train_loss=train_loss, val_loss=v, val_ppl=perplexity(v))


def fit(model, opt, data: ByteData, h: dict, device, *, ckpt_path, meta: dict, start: int = 0, curve=None,
        tokens: int = 0, losses=None, autocast=None, compile: bool = False, quiet: bool = False,
        save=None, reduce=None) -> tuple[int, float]:
    """Train from step ``start`` to ``h["steps"]``; returns (steps run, seconds they took).

    Every ``eval_interval`` steps (and at the last) the validation loss joins ``curve``
    (a list, extended in place; it starts with the untrained model's point) and the
    checkpoint at ``ckpt_path`` is rewritten with ``meta`` (the corpus it came from).
    ``losses`` (a list, extended in place) gets every step's training loss.

    Data-parallel runs (llmfast.train.dist) pass ``save(step, progress)``, their sharded
    checkpoint, and ``reduce(x)``, the mean of a loss over the ranks.
    """
    from llmfast.train.dist import fault
    curve = [] if curve is None else curve
    losses = [] if losses is None else losses
    tok_per_step = h["batch_size"] * data.block_size
    run = torch.compile(model) if compile else model

    def checkpoint(step):
        progress = dict(train=h, tokens=tokens, curve=curve, losses=losses, **meta)
        if save is not None:
            save(step, progress)
        else:
            save_checkpoint(ckpt_path, model, opt, step=step, **progress)

    def tok_s(n, seconds):
        return f"{n * tok_per_step / max(seconds, 1e-9):,.0f} tok/s"

    with Progress(h["steps"], "train", "step", initial=start, disable=quiet) as progress:
        if not curve:
            c = _eval_point(model, data, h, device, autocast, 0, 0, None, reduce)
            curve.append(c)
            progress.write(f"step {0:>6} | val loss {c['val_loss']:.4f} | val ppl {c['val_ppl']:8.3f}")
        model.train()
        t_train, n_train, recent = 0.0, 0, []
        win_t, win_steps = time.perf_counter(), 0   # a recent window for the progress note's tok/s
        for step in range(start, h["steps"]):
            fault(step)
            t0 = time.perf_counter()
            loss = train_step(run, opt, data, step, h, device, autocast).item()   # syncs: the timing is the step's
            if reduce is not None:
                loss = reduce(loss)
            t_train += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise CLIError(f"the loss became {loss} at step {step + 1}; lower --lr or set --grad-clip")
            tokens += tok_per_step
            losses.append(loss)
            n_train += 1
            win_steps += 1
            recent = (recent + [loss])[-h["eval_interval"]:]
            now = time.perf_counter()
            progress.update(f"loss {loss:.4f}, {tok_s(win_steps, now - win_t)}")
            if now - win_t > 5:
                win_t, win_steps = now, 0
            done = step + 1
            if done % h["eval_interval"] == 0 or done == h["steps"]:
                c = _eval_point(model, data, h, device, autocast, done, tokens, sum(recent) / len(recent), reduce)
                curve.append(c)
                progress.write(f"step {done:>6} | train loss {c['train_loss']:.4f} | val loss {c['val_loss']:.4f} | "
                               f"val ppl {c['val_ppl']:8.3f} | {tok_s(n_train, t_train)}")
                checkpoint(done)
    return n_train, t_train


def compare(names, model_cfg: dict, h: dict, data: ByteData, device, *, steps: int, rounds: int, autocast=None,
            compile: bool = False) -> list[dict]:
    """Train the same model on the same batches with each backend in ``names``.

    Returns one dict per backend: ``name``, ``tps`` (tokens/s of each timing round),
    ``peak`` (MB, :func:`llmfast.bench.peak_memory_mb` of two training steps) and
    ``loss`` (after the same number of steps for every backend).
    """
    import llmfast
    from llmfast.bench import peak_memory_mb, time_interleaved

    tok_per_step = h["batch_size"] * model_cfg["block_size"]
    runs = {}
    for name in dict.fromkeys(names):
        torch.manual_seed(h["seed"])   # the same initial weights, and the same batches, for every backend
        model = build_model(model_cfg, device)
        runs[name] = dict(name=name, model=model, opt=make_optimizer(model, h), step=0,
                          run=torch.compile(model) if compile else model)

    def train_steps(r, n):
        with llmfast.backend(r["name"]):
            for _ in range(n):
                r["loss"] = train_step(r["run"], r["opt"], data, r["step"], h, device, autocast).item()
                r["step"] += 1

    for r in runs.values():
        r["peak"] = peak_memory_mb(lambda: train_steps(r, 2), torch.device(device).type)
    # Wall-clock rounds (each step syncs on its loss), alternating the backends.
    timings = time_interleaved({name: (lambda r=r: train_steps(r, steps)) for name, r in runs.items()},
                               rounds=rounds)
    for name, t in timings.items():
        if t.error:
            raise CLIError(f"--compare: training with backend {name} failed: {t.error}")
        runs[name]["tps"] = [tok_per_step * steps / (ms * 1e-3) for ms in t.ms]
    return [dict(name=r["name"], tps=r["tps"], peak=r["peak"], loss=r["loss"]) for r in runs.values()]

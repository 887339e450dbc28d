"""``llmfast`` command line: info | check | bench (and train | generate, in llmfast/train/).

``llmfast bench`` is the main job: it times every op x shape x dtype x available
backend against the torch reference on one device and writes a table, a JSON
file and a PNG plot per op.

What every subcommand shares lives here: ``--help`` shows each default once
(:class:`HelpFormatter`), bad input is one message and exit status 2
(:class:`CLIError`), and progress goes to stderr as a bar on a terminal and as
occasional plain lines elsewhere (:class:`Progress`).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import sys
import time

import torch

import llmfast
from llmfast import backends

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CLIError(Exception):
    """A problem with the user's input: printed as one message, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default shown once, as argparse's "(default: X)" after the help.

    An option whose default is None (the help text says what not giving it means, in
    the same "(default: ...)" form) or False (a flag) gets nothing appended, where
    ArgumentDefaultsHelpFormatter would add "(default: None)".
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Progress:
    """Progress on stderr: a tqdm bar on a terminal, plain lines elsewhere.

    A bar redraws itself with carriage returns, which a CI log or ``| cat`` keeps as
    one ever-growing line; off a terminal a line is printed at every tenth of the work
    instead. ``write`` prints a line of output (stdout) without breaking the bar.
    """

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, disable: bool = False):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self._bar = None
        self._next = self._next_tenth()
        if not disable and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a nicety: plain lines do the job
                return
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True)

    def _next_tenth(self) -> int:
        """The first count past ``n`` that completes another tenth of ``total``."""
        k = self.n * 10 // max(self.total, 1) + 1
        return -(-k * self.total // 10)

    def update(self, note: str = "") -> None:
        """One more unit done; ``note`` says what, or how it went."""
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update()
        elif not self.disable and self.n >= self._next:
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s" + (f" ({note})" if note else ""),
                  file=sys.stderr, flush=True)
            self._next = self._next_tenth()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()


def add_device_argument(parser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when visible, else cpu)")


def add_backend_argument(parser, help="llmfast backend for every op") -> None:
    parser.add_argument("--backend", default="auto", choices=("auto", *backends.BACKENDS), help=help)


def resolve_device(name) -> torch.device:
    """``--device``: given, or cuda when torch sees a GPU; asking for a GPU that is not there is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name}: expected cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}, but no CUDA GPU is visible")
    return device


def _dtypes(args, default):
    return [_DTYPES[d] for d in (args.dtype or default)]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------
# info


def cmd_info(args):
    ext, err = backends._extension()
    print(f"llmfast {llmfast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    tr, terr = backends._triton()
    print(f", triton {tr.__version__ if tr else 'missing'}")
    has_cuda = torch.cuda.is_available()
    if has_cuda:
        print(f"device: cuda ({torch.cuda.get_device_name()}, capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("device: cpu (no CUDA GPU visible)")
    print(f"CPU threads: {torch.get_num_threads()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    if ext is None:
        print(f"llmfast._C: not built: {err}")
    else:
        print(f"llmfast._C: built (CPU ISA {ext.cpu_isa}; CUDA "
              f"{'archs ' + ext.cuda_archs if ext.with_cuda else 'not built'}); CPU outputs of "
              f"{ext.cpu_stream_bytes / 2**20:g} MiB or more are written with streaming stores "
              f"(LLMFAST_CPU_STREAM_BYTES)")
    print(f"backend setting: {backends.current()} (LLMFAST_BACKEND / llmfast.backend())")
    # Without a GPU every cuda row would say why not, for every op: noise unless asked for.
    devices = ["cpu", "cuda"] if has_cuda or args.all else ["cpu"]
    if not has_cuda and not args.all:
        print("cuda rows hidden: no CUDA GPU visible (`llmfast info --all` shows them)")
    print()
    for op, spec in sorted(backends.OPS.items()):
        print(f"{op}:")
        for device in devices:
            for name, why in backends.available(op, device).items():
                state = "available" if why is None else f"unavailable: {why}"
                note = spec.notes.get(name)
                print(f"  {device:5s} {name:7s} {state}" + (f" ({note})" if note else ""))
    return 0


# ----------------------------------------------------------------------------------
# check


def cmd_check(args):
    from llmfast.bench import bench_modules
    from llmfast.testing import compare

    device = str(resolve_device(args.device))
    dtypes = _dtypes(args, ["fp32", "fp16", "bf16"])
    # Every bench module's checks, not just those of the --op modules: a check's op is the
    # first word of its name, and bench_softmax holds log_softmax's too.
    cases = [c for mod in bench_modules().values() for c in mod.checks()]
    if args.op:
        known = {name.split()[0] for name, _, _ in cases} | {name for name, _, _ in cases}
        if set(args.op) - known:
            raise CLIError(f"unknown op or check {sorted(set(args.op) - known)}; known ops: "
                           f"{sorted({name.split()[0] for name, _, _ in cases})}")
        cases = [c for c in cases if c[0].split()[0] in args.op or c[0] in args.op]
    failures, total = 0, 0
    print(f"{'op':<40}{'backend':<9}{'dtype':<10}{'status':<7}worst error (bound)")
    for name, make, fn in cases:
        op = name.split()[0]
        for backend, why in backends.available(op, device).items():
            if why is not None or backend == "torch" or (args.backend and backend not in args.backend):
                continue
            for dt in dtypes:
                if dt not in backends.OPS[op].dtypes_for(backend):
                    continue
                torch.manual_seed(0)
                total += 1
                try:
                    res = compare(fn, make(device, dt), backend)
                    ok = res.ok
                    detail = ", ".join(f"{k} {e:.2e} ({b:.2e})" for k, (e, b) in res.errors.items())
                except Exception as e:  # a crash is a failure, reported with its message
                    ok, detail = False, f"{type(e).__name__}: {e}"
                failures += not ok
                print(f"{name:<40}{backend:<9}{_dtype_name(dt):<10}{'ok' if ok else 'FAIL':<7}{detail}", flush=True)
    print(f"\n{total - failures} passed, {failures} failed")
    return 1 if failures or total == 0 else 0


# ----------------------------------------------------------------------------------
# bench


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _plot(rows, op, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(f"{r.case}\n{r.dtype}" for r in rows))
    provs = list(dict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4.5))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        vals = []
        for c in cases:
            r = next((r for r in rows if f"{r.case}\n{r.dtype}" == c and r.provider == p), None)
            vals.append(r.throughput if r and not math.isnan(r.throughput) else 0)
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
    ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(rows[0].unit if rows else "")
    ax.set_title(f"llmfast bench: {op}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup(r, vs) -> str:
    if math.isnan(r.speedup):
        return "-"
    return f"{r.speedup:.2f}x" + ("*" if r.vs != vs else " ")   # *: torch, standing in for eager (bench.baseline)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()   # empty on Linux, the architecture elsewhere


def _throughput(r) -> str:
    # three digits whatever the scale: CPU attention is a fraction of a TFLOP/s
    return f"{_fmt(r.throughput, '.1f' if r.throughput >= 10 else '.3f')} {r.unit}"


def _table(rows, vs) -> list[str]:
    cols = [("op", "<27", lambda r: r.op), ("case", "<38", lambda r: r.case), ("dtype", "<9", lambda r: r.dtype),
            ("provider", "<16", lambda r: r.provider), ("median ms", ">10", lambda r: _fmt(r.ms, ".3f")),
            ("min ms", ">10", lambda r: _fmt(r.min_ms, ".3f"))]
    if any(r.cpu_ms is not None for r in rows):
        cols.append(("cpu ms", ">10", lambda r: _fmt(r.cpu_ms, ".3f")))
    cols += [("throughput", ">18", _throughput),
             (f"vs {vs} ", ">10", lambda r: _speedup(r, vs)),
             ("max err", ">10", lambda r: _fmt(r.max_err, ".2e"))]
    if any(r.peak_mb is not None for r in rows):
        cols.append(("peak MB", ">10", lambda r: _fmt(r.peak_mb, ".1f")))
    lines = ["".join(format(head, spec) for head, spec, _ in cols)]
    for r in rows:
        lines.append("".join(format(get(r), spec) for _, spec, get in cols) + (f"  [{r.error}]" if r.error else ""))
    return lines


def cmd_bench(args):
    from llmfast.bench import baseline, bench_modules, case_providers, run_case

    device = str(resolve_device(args.device))
    is_cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    mods = bench_modules(args.op)
    if args.op and set(args.op) - set(mods):
        raise CLIError(f"unknown op(s) {sorted(set(args.op) - set(mods))}; known: {sorted(bench_modules())}")
    dtypes = _dtypes(args, ["fp32"])
    work = [(mod, case) for mod in mods.values() for case in mod.cases(args.quick, device, dtypes)
            if not args.case or any(s in case["name"] for s in args.case)]
    if not work:
        raise CLIError(f"no case of {sorted(mods)} matches --case {' / '.join(args.case)}")
    offered = [case_providers(mod, case, device) for mod, case in work]
    unknown = {p for p in (args.provider or []) + [args.vs] if not any(baseline(p, provs) for provs in offered)}
    if unknown:
        raise CLIError(f"no selected case has provider(s) {sorted(unknown)}; they have "
                       f"{sorted(set().union(*offered))}")
    os.makedirs(args.out, exist_ok=True)
    device_name = torch.cuda.get_device_name() if is_cuda else _cpu_name()
    timing = (f"{args.rounds} interleaved rounds" if args.rounds else
              "one do_bench round" if is_cuda else "interleaved rounds, 0.25 s of samples per provider")
    print(f"llmfast bench: {device} ({device_name or 'unknown'}), {torch.get_num_threads()} CPU thread(s); "
          f"{timing}; speedup vs {args.vs}", flush=True)
    rows = []
    with Progress(len(work), "llmfast bench", "case") as progress:
        for mod, case in work:
            rows += run_case(mod, case, device, memory=args.memory or getattr(mod, "MEMORY", False),
                             rounds=args.rounds, vs=args.vs, only=args.provider)
            progress.update(f"{mod.OP}: {case['name']} {_dtype_name(case['dtype'])}")
    print("\n".join(_table(rows, args.vs)))
    print(f"\nmedian / min ms: of the provider's samples, one per round{' (each a do_bench median)' if is_cuda else ''}"
          + ("; cpu ms: process CPU time of all threads" if not is_cuda else "")
          + f"; vs {args.vs}: its median time / the provider's"
          + ("; *: vs torch, whose op is the eager form in that case"
             if any(r.vs not in (None, args.vs) for r in rows) else ""))
    meta = dict(device=device, device_name=device_name, torch=torch.__version__, llmfast=llmfast.__version__,
                threads=torch.get_num_threads(), time=time.strftime("%Y-%m-%dT%H:%M:%S"), quick=args.quick,
                rounds=args.rounds, vs=args.vs, case=args.case, provider=args.provider)
    for op in mods:
        op_rows = [r for r in rows if r.op == op]
        if not op_rows:
            continue
        with open(os.path.join(args.out, f"{op}.json"), "w") as f:
            json.dump(dict(meta, rows=[r.as_dict() for r in op_rows]), f, indent=1)
        try:
            _plot(op_rows, op, os.path.join(args.out, f"{op}.png"))
        except ImportError:
            print("llmfast bench: matplotlib is missing; no plot written", file=sys.stderr)
    print(f"\nwrote {len({r.op for r in rows})} JSON + PNG file pair(s) to {args.out}/")
    return 1 if any(r.error for r in rows) else 0


# ----------------------------------------------------------------------------------


def _add_dtype_argument(parser, default):
    parser.add_argument("--dtype", action="append", choices=sorted(_DTYPES),
                        help=f"repeatable (default: {default})")


def build_parser():
    p = argparse.ArgumentParser(prog="llmfast", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    # parser_class: every subcommand's --help follows the same rule for defaults
    sub = p.add_subparsers(dest="cmd", required=True,
                           parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
    i = sub.add_parser("info", help="versions, device, and which backend can run each op (or why not)")
    i.add_argument("--all", action="store_true", help="also the cuda rows on a machine without a CUDA GPU")
    c = sub.add_parser("check", help="every op x available backend against the float64 reference")
    c.add_argument("--op", action="append", help="only this op, or this check by name (repeatable)")
    c.add_argument("--backend", action="append", choices=[b for b in backends.BACKENDS if b != "torch"],
                   help="only this backend (repeatable; default: every available one)")
    add_device_argument(c)
    _add_dtype_argument(c, "fp32, fp16 and bf16")
    b = sub.add_parser("bench", help="time every op x shape x dtype x backend against torch")
    b.add_argument("--op", action="append", help="only this op (repeatable)")
    b.add_argument("--case", action="append", metavar="SUBSTRING",
                   help="only cases whose name contains this, e.g. 'fwd 4096x4096' (repeatable)")
    b.add_argument("--provider", action="append",
                   help="only this provider, e.g. llmfast:cpu or eager (repeatable; torch and the --vs "
                        "baseline always run)")
    b.add_argument("--vs", default="torch", metavar="PROVIDER",
                   help="the speedup column's baseline; 'eager' is the sequence of torch ops users write, "
                        "which is torch itself where a case has no separate eager provider")
    add_device_argument(b)
    _add_dtype_argument(b, "fp32")
    b.add_argument("--rounds", type=int, metavar="N",
                   help="time N interleaved rounds, each provider once per round (default: on CPU, rounds "
                        "until the samples add up to 0.25 s per provider; on CUDA one do_bench median)")
    b.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    b.add_argument("--quick", action="store_true", help="small shapes, a minute or two on a laptop CPU")
    b.add_argument("--memory", action="store_true",
                   help="also measure peak memory of every provider (always on for ops that set MEMORY)")
    b.add_argument("--out", default="bench-results", help="folder for the JSON and PNG files")
    for mod in _extra_commands():
        mod.add_parser(sub)
    return p


def _extra_commands():
    """Subcommands that live in their own packages (train, generate)."""
    return [importlib.import_module("llmfast.train")]


def main(argv=None):
    args = build_parser().parse_args(argv)
    handler = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}.get(args.cmd)
    if handler is None:
        handler = next(m.run for m in _extra_commands() if args.cmd in m.COMMANDS)
    try:
        return handler(args)
    except (CLIError, backends.BackendUnavailableError) as e:
        print(f"llmfast {args.cmd}: error: {e}", file=sys.stderr)
        return 2

"""``llmfast`` command line: info | check | bench (and train | generate).

``llmfast bench`` is the main job: it times every op x shape x dtype x available
backend against the torch reference on one device and writes a table, a JSON
file and a PNG plot per op.
"""
from __future__ import annotations

import argparse
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


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _op_modules():
    """llmfast.ops.<op> modules that declare ``checks()``."""
    import pkgutil

    import llmfast.ops as pkg

    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"llmfast.ops.{info.name}")
            if hasattr(mod, "checks"):
                mods.append(mod)
    return mods


# ----------------------------------------------------------------------------------
# info


def cmd_info(args):
    ext, err = backends._extension()
    print(f"llmfast {llmfast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    tr, terr = backends._triton()
    print(f", triton {tr.__version__ if tr else 'missing'}")
    if torch.cuda.is_available():
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
    print(f"backend setting: {backends.current()} (LLMFAST_BACKEND / llmfast.backend())\n")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op, spec in sorted(backends.OPS.items()):
        print(f"{op}:")
        for device in devices + ([] if "cuda" in devices else ["cuda"]):
            for name, why in backends.available(op, device).items():
                state = "available" if why is None else f"unavailable: {why}"
                note = spec.notes.get(name)
                print(f"  {device:5s} {name:7s} {state}" + (f" ({note})" if note else ""))
    return 0


# ----------------------------------------------------------------------------------
# check


def cmd_check(args):
    from llmfast.testing import compare

    device = args.device or _default_device()
    dtypes = [_DTYPES[d] for d in args.dtype] if args.dtype else [torch.float32, torch.float16, torch.bfloat16]
    failures, total = 0, 0
    print(f"{'op':<40}{'backend':<9}{'dtype':<10}{'status':<7}worst error (bound)")
    for mod in _op_modules():
        for name, make, fn in mod.checks():
            op = name.split()[0]
            if args.op and op not in args.op and name not in args.op:
                continue
            for backend, why in backends.available(op, device).items():
                if why is not None or backend == "torch":
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
                    dts = str(dt).replace("torch.", "")
                    print(f"{name:<40}{backend:<9}{dts:<10}{'ok' if ok else 'FAIL':<7}{detail}", flush=True)
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


def cmd_bench(args):
    from llmfast.bench import bench_modules, run_case

    device = args.device or _default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("llmfast bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    dtypes = [_DTYPES[d] for d in (args.dtype or ["float32"])]
    mods = bench_modules(args.op)
    if args.op and set(args.op) - set(mods):
        print(f"llmfast bench: unknown op(s) {sorted(set(args.op) - set(mods))}; known: {sorted(bench_modules())}",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety
        tqdm = None
    work = [(mod, case) for mod in mods.values() for case in mod.cases(args.quick, device, dtypes)]
    bar = tqdm(total=len(work), desc="llmfast bench", unit="case", file=sys.stderr) if tqdm else None
    rows = []
    for mod, case in work:
        if bar:
            bar.set_postfix_str(f"{mod.OP}: {case['name']}")
        rows += run_case(mod, case, device, memory=args.memory or getattr(mod, "MEMORY", False))
        if bar:
            bar.update()
    if bar:
        bar.close()
    header = f"{'op':<27}{'case':<38}{'dtype':<9}{'provider':<16}{'median ms':>10}{'throughput':>16}{'speedup':>9}{'max err':>10}"
    if any(r.peak_mb is not None for r in rows):
        header += f"{'peak MB':>10}"
    print(header)
    for r in rows:
        line = (f"{r.op:<27}{r.case:<38}{r.dtype:<9}{r.provider:<16}{_fmt(r.ms, '10.3f')}"
                f"{_fmt(r.throughput, '10.1f'):>10} {r.unit:<7}{_fmt(r.speedup, '8.2f')}x{_fmt(r.max_err, '10.2e')}")
        if r.peak_mb is not None:
            line += _fmt(r.peak_mb, "10.1f")
        if r.error:
            line += f"  [{r.error}]"
        print(line)
    meta = dict(device=device, device_name=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
                torch=torch.__version__, llmfast=llmfast.__version__, threads=torch.get_num_threads(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S"), quick=args.quick)
    for op in mods:
        op_rows = [r for r in rows if r.op == op]
        with open(os.path.join(args.out, f"{op}.json"), "w") as f:
            json.dump(dict(meta, rows=[r.as_dict() for r in op_rows]), f, indent=1)
        try:
            _plot(op_rows, op, os.path.join(args.out, f"{op}.png"))
        except ImportError:
            print("llmfast bench: matplotlib is missing; no plot written", file=sys.stderr)
    print(f"\nwrote {len(mods)} JSON + PNG file pair(s) to {args.out}/")
    return 1 if any(r.error for r in rows) else 0


# ----------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(prog="llmfast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, and which backend can run each op (or why not)")
    c = sub.add_parser("check", help="every op x available backend against the float64 reference")
    c.add_argument("--op", action="append", help="only this op (repeatable)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    c.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable; default fp32, fp16, bf16")
    b = sub.add_parser("bench", help="time every op x shape x dtype x backend against torch")
    b.add_argument("--op", action="append", help="only this op (repeatable)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    b.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable; default float32")
    b.add_argument("--quick", action="store_true", help="small shapes, a minute or two on a laptop CPU")
    b.add_argument("--memory", action="store_true", help="also measure peak memory of every provider")
    b.add_argument("--out", default="bench-results", help="folder for the JSON and PNG files")
    for mod in _extra_commands():
        mod.add_parser(sub)
    return p


def _extra_commands():
    """Subcommands that live in their own modules (train, generate)."""
    mods = []
    for name in ("llmfast.train",):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def main(argv=None):
    args = build_parser().parse_args(argv)
    handler = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}.get(args.cmd)
    if handler is None:
        handler = next(m.run for m in _extra_commands() if args.cmd in m.COMMANDS)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())

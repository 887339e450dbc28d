"""`llmfast info | check | bench` and what every subcommand shares (help, progress, errors).

`llmfast train | generate` are tested in test_train_cli.py.
"""
import json
import re
import sys
import types

import pytest
import torch

from llmfast import bench
from llmfast.cli import Progress, main

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------
# info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the output of a machine without CUDA")
def test_info_hides_cuda_rows_without_a_gpu(capsys):
    def cuda_rows(out):
        return [line for line in out.splitlines() if re.match(r"\s+cuda\s", line)]

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert not cuda_rows(out)
    assert out.count("cuda rows hidden") == 1 and "--all" in out
    assert main(["info", "--all"]) == 0
    out = capsys.readouterr().out
    assert cuda_rows(out) and "cuda rows hidden" not in out


# ----------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("cmd", [[], ["info"], ["check"], ["bench"], ["train"], ["generate"]])
def test_help_shows_each_default_once(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")   # no wrapping: one option, one line
    with pytest.raises(SystemExit):
        main([*cmd, "--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text)[1:]
    assert entries
    for entry in entries:
        assert entry.lower().count("default") <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    expected = {"train": ["--n-layer N_LAYER", "(default: 4)"], "bench": ["--out OUT", "(default: bench-results)"],
                "generate": ["--top-k TOP_K", "(default: 40)"]}.get(cmd[0] if cmd else None)
    if expected:
        option, default = expected
        assert default in next(e for e in entries if e.split("  ")[0].endswith(option))


# ----------------------------------------------------------------------------------
# progress


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_only_on_a_terminal(tty, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    with Progress(20, "work", "item") as p:
        for i in range(20):
            p.update(f"item {i}")
        p.write("output line")
    out, err = capsys.readouterr()
    assert "output line" in out
    if tty:
        assert "\r" in err
    else:
        assert "\r" not in err
        lines = err.splitlines()
        assert len(lines) == 10 and lines[0] == "work: 2/20 items (item 1)" and lines[-1].startswith("work: 20/20")


# ----------------------------------------------------------------------------------
# bench


def _fake_bench(providers=("eager",)):
    """A bench module whose providers log their calls and do a little work."""
    calls = []
    x = torch.randn(64, 64)

    def setup(provider, case, device):
        def fn():
            calls.append(provider)
            return x @ x
        return fn

    mod = types.SimpleNamespace(OP="softmax", providers=lambda case, device: list(providers), setup=setup,
                                work=lambda case: ("GB/s", 1e6), reference=lambda case, device: x.double() @ x.double())
    return mod, dict(name="tiny", dtype=torch.float32), calls


def test_rounds_interleave_providers_and_speedup_is_vs_the_baseline():
    mod, case, calls = _fake_bench()
    rows = bench.run_case(mod, case, "cpu", rounds=4, vs="eager", only=["eager"])
    # correctness call, warm-up, then 4 rounds: torch, eager, torch, eager, ...
    assert calls == ["torch", "eager"] * 6
    by = {r.provider: r for r in rows}
    assert set(by) == {"torch", "eager"} and all(r.samples == 4 and r.vs == "eager" for r in rows)
    assert by["eager"].speedup == 1.0
    assert by["torch"].speedup == pytest.approx(by["eager"].ms / by["torch"].ms)
    assert by["torch"].min_ms <= by["torch"].ms and by["torch"].cpu_ms is not None


def test_vs_eager_is_torch_where_a_case_has_no_eager_provider():
    mod, case, _ = _fake_bench(providers=())
    rows = bench.run_case(mod, case, "cpu", rounds=2, vs="eager", only=["none"])
    assert [(r.provider, r.vs, r.speedup) for r in rows] == [("torch", "torch", 1.0)]


def test_a_provider_that_fails_while_timed_leaves_the_others_timed():
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] > 2:
            raise RuntimeError("out of memory")

    t = bench.time_interleaved({"ok": lambda: None, "flaky": flaky}, rounds=5)
    assert len(t["ok"].ms) == 5 and t["flaky"].error == "RuntimeError: out of memory" and len(t["flaky"].ms) == 1


def _bench(tmp_path, *extra):
    return main(["bench", "--op", "softmax", "--quick", "--case", "log_softmax fwd", "--provider", "llmfast:cpu",
                 "--out", str(tmp_path), *extra])


def test_bench_rounds_and_vs_from_the_command_line(tmp_path, capsys):
    assert _bench(tmp_path, "--rounds", "3", "--vs", "llmfast:cpu") == 0
    out, err = capsys.readouterr()
    assert "vs llmfast:cpu" in out and "3 interleaved rounds" in out
    rows = json.loads((tmp_path / "softmax.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["torch", "llmfast:cpu"]   # --provider, and torch: the reference row
    assert all(r["samples"] == 3 and r["vs"] == "llmfast:cpu" and r["error"] is None for r in rows)
    assert rows[1]["speedup"] == 1.0 and rows[0]["max_err"] < 1e-5
    # off a terminal: plain progress lines, no carriage returns
    assert "\r" not in out + err and "llmfast bench: 1/1 cases (softmax: log_softmax fwd" in err


@pytest.mark.parametrize("argv, message", [(["--case", "no such case"], "no case of ['softmax'] matches"),
                                           (["--vs", "nope"], "no selected case has provider(s) ['nope']"),
                                           (["--device", "tpu"], "--device tpu")])
def test_bench_bad_selection_is_a_message(tmp_path, capsys, argv, message):
    assert main(["bench", "--op", "softmax", "--quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmfast bench: error:") and message in err


# ----------------------------------------------------------------------------------
# check


def test_check_runs_the_bench_modules_checks(capsys):
    assert main(["check", "--op", "softmax", "--dtype", "fp32", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    names = [line[:40].strip() for line in out.splitlines()[1:] if line.strip() and "passed" not in line]
    assert names == ["softmax", "softmax dim=1", "softmax scale+mask", "softmax causal"]
    assert "4 passed, 0 failed" in out


def test_check_discovers_cases_from_bench_modules(capsys, monkeypatch):
    from llmfast.benchmarks import bench_softmax
    from llmfast.nn import functional as F

    monkeypatch.setattr(bench_softmax, "checks", lambda: [
        ("log_softmax from the bench module", lambda device, dtype: [torch.randn(3, 50, device=device).to(dtype)],
         lambda x: F.log_softmax(x, -1))])
    assert main(["check", "--op", "log_softmax", "--dtype", "fp32", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "log_softmax from the bench module" in out and "1 passed, 0 failed" in out

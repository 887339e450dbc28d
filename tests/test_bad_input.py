"""Bad input never crashes the process: the table of tests/bad_input_table.py (every public
function x wrong dtype / device / rank / shape, bad indices, empty tensors, non-tensors)
runs on every backend in one child process. A watchdog reads the child's BEGIN/END lines:
a case that segfaults, aborts or hangs is reported by name, and a new child resumes after
it, so one crash neither hides the other cases nor takes pytest down."""
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import llmfast
from tests.bad_input_table import cases, selftest_cases

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT = 60.0     # seconds one case may take (the interpreter and emulator are slow, not this slow)
START_TIMEOUT = 180.0   # importing torch and llmfast in the child on a busy machine


def _backends() -> list:
    return ["torch"] + [b for b, why in llmfast.available("attention", "cpu").items() if why is None and b != "torch"]


def _pump(pipe, lines: queue.Queue):
    for line in pipe:
        lines.put(line)
    lines.put(None)   # end of file: the child exited


def run_table(backends: list, n_cases: int, *, selftest=False, case_timeout=CASE_TIMEOUT) -> dict:
    """{index: failure} for every misbehaving (backend, case) pair; index = b * n_cases + i."""
    env = dict(os.environ, TRITON_INTERPRET="1", LLMFAST_CUDA_EMU="1", PYTHONPATH=str(ROOT))
    failures, start, total = {}, 0, len(backends) * n_cases
    while start < total:
        cmd = [sys.executable, "-m", "tests.bad_input_table", "--backends", ",".join(backends), "--start", str(start)]
        proc = subprocess.Popen(cmd + (["--selftest"] if selftest else []), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines, err = queue.Queue(), []
        # the pipes and the queue are bound now: a killed child's reader must not feed the next one's queue
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        threading.Thread(target=err.extend, args=(proc.stderr,), daemon=True).start()
        current, timeout = start, START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:   # a hang: kill the child and blame the case it is in
                proc.kill()
                proc.wait()
                failures[current] = f"hung (no result in {timeout:.0f} s)"
                break
            if line is None:      # the child died inside a case: a crash
                proc.wait()
                failures[current] = f"the process died (exit code {proc.returncode}): {''.join(err)[-300:].strip()}"
                break
            word, *rest = line.strip().split(" ", 2)
            if word == "BEGIN":
                current, timeout = int(rest[0]), case_timeout
            elif word == "END" and rest[1].startswith("FAIL"):
                failures[int(rest[0])] = rest[1][5:]
            elif word == "DONE":
                proc.wait()
                return failures
        start = current + 1
    return failures


def test_bad_input_table():
    table, backends = cases(), _backends()
    failures = run_table(backends, len(table))
    report = "\n".join(f"  [{backends[i // len(table)]}] {table[i % len(table)].name}: {why}"
                       for i, why in sorted(failures.items()))
    assert not failures, (f"{len(failures)} of {len(table)} cases x {len(backends)} backends misbehave:\n{report}")


def test_watchdog_reports_crashes_and_hangs_by_name():
    failures = run_table(["torch"], len(selftest_cases()), selftest=True, case_timeout=5.0)
    assert set(failures) == {0, 1}, failures   # the segfault and the hang; the raising case after them passes
    assert "died" in failures[0] and "hung" in failures[1]

"""Data-parallel `llmfast train` (llmfast/train/dist.py) on 2 gloo processes against 1 process.

The global batch is the same for any number of processes (each rank trains on its rows of
it), so a 2-process run must draw the 1-process loss curve. They are not bitwise equal:
the gradient of the mean loss is summed in a different order (half-batch means averaged
by DDP's all-reduce or FSDP's reduce-scatter), which moves fp32 losses by ~1e-6 over
these few steps; the stated tolerance is 1e-5 absolute per step (losses ~5).
"""
import os
import subprocess
import sys
import time

import pytest

from llmfast.cli import main
from llmfast.train import load_checkpoint

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2", "--lr", "1e-2", "--warmup", "2", "--steps", "6", "--eval-interval", "3",
        "--quiet", "--threads", "1"]
TOL = 1e-5

pytestmark = [pytest.mark.ddp, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    return f


def _argv(corpus, out, *extra):
    return ["train", "--data", str(corpus), "--out-dir", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(_argv(corpus, out)) == 0
    return load_checkpoint(out)


def _run(cmd, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", **(env_extra or {}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=timeout)
    return r, time.monotonic() - t0


def _same_curve(got, want, steps):
    assert len(got["losses"]) == len(want["losses"][:steps]) == steps
    for i, (a, b) in enumerate(zip(got["losses"], want["losses"])):
        assert abs(a - b) <= TOL, f"step {i + 1}: {a} vs {b}"
    for a, b in zip(got["curve"], want["curve"]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) <= TOL


def test_ddp_rank_failure_then_resume_on_one_process(corpus, tmp_path, one_process, capsys):
    # 2 processes (--nproc: the elastic launcher), DDP; rank 1 raises before step 5
    out = tmp_path / "ddp"
    r, _ = _run(["-m", "llmfast", *_argv(corpus, out, "--nproc", "2", "--norm", "rmsnorm")],
                {"LLMFAST_TRAIN_FAULT": "1:4"})
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("llmfast train: error: rank 1 of 2 failed") and "injected failure" in last
    assert "DDP over gloo" in r.stdout and r.stdout.count("llmfast train:") == 1   # rank 0 alone prints
    shards = sorted(out.glob("dcp-*"))
    assert [s.name for s in shards] == ["dcp-00000003"] and not (out / "ckpt.pt").exists()
    # the sharded checkpoint of step 3 resumes on ONE process, and the curve continues the 1-process one
    assert main(["train", "--out-dir", str(out), "--resume", "--quiet", "--threads", "1"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # (rmsnorm here, layernorm in the FSDP test: both norms' kernels run on wrapped parameters)
    assert main(_argv(corpus, tmp_path / "one_rms", "--norm", "rmsnorm")) == 0
    _same_curve(load_checkpoint(out), load_checkpoint(tmp_path / "one_rms"), 6)
    # ckpt.pt (step 6, that resumption's) is newer than dcp-00000003: consolidating must not replace it
    assert main(["consolidate", str(out)]) == 2
    assert "is newer than the newest sharded checkpoint" in capsys.readouterr().err


def test_fsdp_under_plain_torchrun_matches_one_process(corpus, tmp_path, one_process, capsys):
    out = tmp_path / "fsdp"
    r, _ = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmfast",
                 *_argv(corpus, out, "--parallel", "fsdp")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP over gloo" in r.stdout
    assert [s.name for s in out.glob("dcp-*")] == ["dcp-00000006"]   # older shards removed once superseded
    got = load_checkpoint(out)   # consolidated at the end: the single file `generate` reads
    _same_curve(got, one_process, 6)
    for k, w in one_process["model"].items():
        assert (got["model"][k] - w).abs().max() <= 1e-5, k
    assert main(["generate", str(out), "-n", "8", "--seed", "0"]) == 0
    (out / "ckpt.pt").unlink()
    assert main(["generate", str(out)]) == 2
    assert "llmfast consolidate" in capsys.readouterr().err   # the message says how to get the file
    assert main(["consolidate", str(out)]) == 0
    again = load_checkpoint(out)
    assert again["losses"] == got["losses"] and all(again["model"][k].equal(got["model"][k]) for k in got["model"])


@pytest.mark.slow
def test_ddp_full_run_matches_one_process(corpus, tmp_path, one_process):
    r, _ = _run(["-m", "llmfast", *_argv(corpus, tmp_path / "d", "--nproc", "2")])
    assert r.returncode == 0, r.stderr[-3000:]
    _same_curve(load_checkpoint(tmp_path / "d"), one_process, 6)


@pytest.mark.slow
def test_hung_rank_times_out(corpus, tmp_path):
    # rank 1 stops (sleeps) before step 2: rank 0's all-reduce gives up after --dist-timeout
    r, seconds = _run(["-m", "llmfast", *_argv(corpus, tmp_path / "h", "--nproc", "2", "--dist-timeout", "10")],
                      {"LLMFAST_TRAIN_FAULT": "1:1:hang"}, timeout=200)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "rank 0 of 2 failed" in r.stderr.strip().splitlines()[-1]
    assert seconds < 150

"""`llmfast train` / `llmfast generate` end to end in a temporary folder."""
import os
import subprocess
import sys

import pytest
import torch

from llmfast.cli import main
from llmfast.train import default_corpus_files, load_checkpoint, load_corpus

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2", "--lr", "1e-2", "--warmup", "2", "--quiet"]


# tiny models: one thread (conftest.one_thread says why)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.py").write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(150)))
    (d / "b.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    (d / "skip.bin").write_bytes(bytes(range(256)))   # not a text suffix: a folder takes text files only
    return d


def _train(corpus, out, *extra):
    return main(["train", "--data", str(corpus), "--out-dir", str(out), *TINY, *extra])


def test_train_resume_generate(corpus, tmp_path, capsys, interrupt_training):
    # one run of 12 steps ...
    assert _train(corpus, tmp_path / "full", "--steps", "12", "--eval-interval", "4") == 0
    out = capsys.readouterr().out
    assert "validation curve" in out and "val ppl" in out and "tokens/s" in out
    full = load_checkpoint(tmp_path / "full")["curve"]
    assert [c["step"] for c in full] == [0, 4, 8, 12]
    assert full[-1]["val_ppl"] < full[0]["val_ppl"] * 0.7   # clearly learning
    # ... and the same run interrupted (Ctrl-C) during step 10, then resumed, gives the same curve
    interrupt_training(9)
    assert _train(corpus, tmp_path / "part", "--steps", "12", "--eval-interval", "4") == 130
    assert "interrupted" in capsys.readouterr().err
    interrupt_training(None)
    assert load_checkpoint(tmp_path / "part")["step"] == 8
    assert main(["train", "--out-dir", str(tmp_path / "part"), "--resume", "--quiet"]) == 0
    part = load_checkpoint(tmp_path / "part")["curve"]
    assert [c["step"] for c in part] == [0, 4, 8, 12]
    for a, b in zip(full, part):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert "resumed from" in capsys.readouterr().out

    assert main(["generate", str(tmp_path / "part"), "--prompt", "def f", "-n", "30", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f") and len(text.encode()) >= 30
    assert main(["generate", str(tmp_path / "part" / "ckpt.pt"), "--temperature", "0", "-n", "5"]) == 0


def test_backend_flag_and_sgd(corpus, tmp_path, capsys):
    assert _train(corpus, tmp_path / "r", "--steps", "3", "--eval-interval", "3", "--backend", "torch",
                  "--optimizer", "sgd", "--pos-embedding", "rope", "--norm", "rmsnorm") == 0
    assert "llmfast backend torch" in capsys.readouterr().out


def test_compare_backends(corpus, tmp_path, capsys):
    assert _train(corpus, tmp_path / "c", "--compare", "torch,cpu", "--compare-steps", "1", "--compare-rounds", "2") == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "peak MB" in out
    assert any(line.startswith("cpu") for line in out.splitlines())


def test_progress_off_a_terminal_is_plain_lines(corpus, tmp_path, capsys):
    argv = ["train", "--data", str(corpus), "--out-dir", str(tmp_path / "r"), *TINY, "--steps", "20"]
    argv.remove("--quiet")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err   # a tqdm bar would redraw itself with carriage returns
    lines = err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("train: 2/20 steps (loss ") and "tok/s" in lines[0]


def test_default_corpus_is_the_stdlib():
    files = default_corpus_files()
    assert any(f.name == "os.py" for f in files)
    data, where = load_corpus(None, 50_000, seed=0)
    assert len(data) <= 50_000 + 100 and "stdlib" in where


@pytest.mark.parametrize("case", ["missing", "empty", "empty_dir", "tiny", "bad_ckpt", "truncated_ckpt",
                                  "no_ckpt", "resume_changes_model", "bad_steps"])
def test_bad_input_is_a_message(case, corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    good = tmp_path / "g"
    if case in ("truncated_ckpt", "resume_changes_model"):
        assert _train(corpus, good, "--steps", "1", "--eval-interval", "1") == 0
        capsys.readouterr()
    trunc = tmp_path / "trunc.pt"
    if case == "truncated_ckpt":
        trunc.write_bytes((good / "ckpt.pt").read_bytes()[:4000])
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "small.txt").write_text("abc")
    argv, expect = {
        "missing": (["train", "--data", str(tmp_path / "nope")], "does not exist"),
        "empty": (["train", "--data", str(empty)], "empty"),
        "empty_dir": (["train", "--data", str(tmp_path / "emptydir")], "no text files"),
        "tiny": (["train", "--data", str(tmp_path / "small.txt")], "too small"),
        "bad_ckpt": (["generate", str(bad)], "cannot read checkpoint"),
        "truncated_ckpt": (["generate", str(trunc)], "cannot read checkpoint"),
        "no_ckpt": (["train", "--out-dir", str(tmp_path / "none"), "--resume"], "no checkpoint"),
        "resume_changes_model": (["train", "--out-dir", str(good), "--resume", "--n-layer", "3"], "differs"),
        "bad_steps": (["train", "--data", str(corpus), "--steps", "0"], "must be positive"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert err.startswith(f"llmfast {argv[0]}: error:")


def test_no_traceback_from_the_command_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    for argv in (["generate", str(bad)],):   # (the other messages are checked in-process above)
        r = subprocess.run([sys.executable, "-m", "llmfast", *argv], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_checkpoint_is_plain_data(corpus, tmp_path):
    assert _train(corpus, tmp_path / "r", "--steps", "1", "--eval-interval", "1") == 0
    # weights_only loading (no pickled code) is what `generate` and `--resume` use
    state = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "config", "train", "step", "curve"} <= state.keys()

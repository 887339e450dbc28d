"""Durable `llmfast train` checkpoints and bit-exact resumption.

* N steps straight and N/2 + ``--resume`` + N/2 give bitwise the same per-step losses,
  final parameters and optimizer state (dropout on, so the RNG states matter);
* a run SIGKILLed half-way through writing a checkpoint resumes from the last good one
  and still ends bitwise where the uninterrupted run does;
* a damaged checkpoint (a flipped bit inside a tensor) is a message naming the file.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llmfast.cli import main
from llmfast.train import load_checkpoint

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2", "--lr", "1e-2", "--warmup", "2", "--dropout", "0.1", "--steps", "12",
        "--eval-interval", "3", "--quiet", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    return f


def _argv(corpus, out, *extra):
    return ["train", "--data", str(corpus), "--out-dir", str(out), *TINY, *extra]


def _assert_same_run(a, b):
    assert a["step"] == b["step"] == 12
    assert a["losses"] == b["losses"] and len(a["losses"]) == 12   # floats compared exactly
    assert a["curve"] == b["curve"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.fixture
def straight(corpus, tmp_path):
    assert main(_argv(corpus, tmp_path / "straight")) == 0
    return load_checkpoint(tmp_path / "straight")


def test_resume_is_bitwise(corpus, tmp_path, straight, interrupt_training, capsys):
    interrupt_training(6)
    assert main(_argv(corpus, tmp_path / "part")) == 130
    interrupt_training(None)
    half = load_checkpoint(tmp_path / "part")
    assert half["step"] == 6 and half["losses"] == straight["losses"][:6]
    assert main(["train", "--out-dir", str(tmp_path / "part"), "--resume", "--quiet", "--threads", "1"]) == 0
    _assert_same_run(straight, load_checkpoint(tmp_path / "part"))


# Runs `llmfast train` with the checkpoint writer replaced: its second save writes half of
# the checkpoint's bytes to the temporary file and then the process SIGKILLs itself.
_KILL_ON_SECOND_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    from llmfast.train import checkpoints
    real, saves = checkpoints._write, []

    def dying(f, state):
        saves.append(1)
        if len(saves) == 2:
            buf = io.BytesIO()
            real(buf, state)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(f, state)

    checkpoints._write = dying
    from llmfast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_killed_while_saving_resumes_from_last_good(corpus, tmp_path, straight):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _KILL_ON_SECOND_SAVE, *_argv(corpus, out)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert list(out.glob(".ckpt.pt.tmp-*")), "the half-written temporary file should be left behind"
    assert load_checkpoint(out)["step"] == 3   # the last good checkpoint, untouched by the killed save
    assert main(["train", "--out-dir", str(out), "--resume", "--quiet", "--threads", "1"]) == 0
    assert not list(out.glob(".ckpt.pt.tmp-*"))   # the next save cleans up
    _assert_same_run(straight, load_checkpoint(out))


def test_damaged_checkpoint_is_a_clear_error(straight, tmp_path, capsys):
    data = bytearray((tmp_path / "straight" / "ckpt.pt").read_bytes())
    # flip one byte inside the largest record (a weight tensor's data): the zip still opens
    import zipfile

    with zipfile.ZipFile(tmp_path / "straight" / "ckpt.pt") as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0x40
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    assert main(["generate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "CRC-32" in err and "Traceback" not in err

"""Bitwise reproducibility of every public op, forward and every gradient: on the cpu backend
run to run, across thread counts and under concurrency; on triton and cuda run to run.

- run to run: the same call twice gives the same bits;
- across thread counts: torch.set_num_threads(1), 2 and 3, each in its own process (the
  thread count is fixed once per process), give the same bits. Reductions that cross
  rows (weight gradients, dQ over key tiles, split-KV) use a chunking that does not
  depend on the thread count (docs/design.md, "Numerics");
- concurrency: the ops called from 8 Python threads at once give the serial bits.

Shapes are small but span several parallel tasks (rows > one grain, several key tiles,
several KV splits), so a thread-dependent split would show. Run as a script
(``python tests/test_determinism.py OUT.pt``) it computes every case once per
``--threads`` and saves the results: the test compares those files.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import DEVICE

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cases(small=False, device="cpu"):
    """name -> (fn, inputs, grad flags). Inputs from a fixed generator: every process sees the same.

    ``small``: shapes for the Triton interpreter and the CUDA warp emulator (still several
    programs per op: rows > one block, several key tiles and KV splits)."""
    from llmfast import flash_attn
    from llmfast.nn import functional as F

    g = torch.Generator().manual_seed(0)
    # the sizes that matter for splitting: classes, rows x features, attention lengths, cache
    C, M, N, L, Lf, seg, cache, rows, cols = ((300, 40, 96, 80, 48, (30, 70), 256, 16, 96) if small else
                                              (5000, 512, 384, 300, 200, (150, 400), 2048, 256, 1000))

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    t = torch.randint(0, C, (64,), generator=g).to(device)
    t[::7] = -100
    tf = torch.randint(0, 1000, (300,), generator=g).to(device)
    x_ln, w_ln, b_ln, r_ln = rn(M, N, scale=2.0), rn(N) * 0.1 + 1, rn(N) * 0.1, rn(M, N)
    q, k, v = rn(1, 2, L, 32), rn(1, 2, L, 32), rn(1, 2, L, 32)
    qf, kf, vf = rn(2, Lf, 4, 32), rn(2, Lf, 2, 32), rn(2, Lf, 2, 32)
    cu = torch.tensor([0, *seg], dtype=torch.int32, device=device)
    qv, kv, vv = rn(seg[1], 4, 32), rn(seg[1], 2, 32), rn(seg[1], 2, 32)
    kc, vc = rn(1, cache, 2, 64), rn(1, cache, 2, 64)
    qd = rn(1, 1, 4, 64)
    seqlens = torch.tensor([cache - 48], dtype=torch.int32, device=device)
    return {
        "softmax": (lambda x: F.softmax(x, -1), [rn(64, cols, scale=3.0)], None),
        "softmax_causal": (lambda x: F.softmax(x, -1, is_causal=True), [rn(2, 96, 96)], None),
        "log_softmax": (lambda x: F.log_softmax(x, -1), [rn(64, cols, scale=3.0)], None),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, (N,), w, b), [x_ln, w_ln, b_ln], None),
        "layer_norm_residual": (lambda x, r, w, b: F.layer_norm(x, (N,), w, b, residual=r),
                                [x_ln, r_ln, w_ln, b_ln], None),
        "rms_norm": (lambda x, w: F.rms_norm(x, (N,), w), [x_ln, w_ln], None),
        "layer_norm_": (lambda x, w, b: F.layer_norm_(x.clone(), (N,), w, b), [x_ln, w_ln, b_ln], False),
        "rms_norm_": (lambda x, w: F.rms_norm_(x.clone(), (N,), w), [x_ln, w_ln], False),
        "sdpa_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], None),
        "flash_attention": (lambda q, k, v: F.flash_attention(q, k, v, causal=True), [q, k, v], None),
        "flash_attn_func": (lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(Lf // 3, 0)),
                            [qf, kf, vf], None),
        "flash_attn_varlen_func": (lambda q, k, v: flash_attn.flash_attn_varlen_func(
            q, k, v, cu, cu, seg[1] - seg[0], seg[1] - seg[0], causal=True), [qv, kv, vv], None),
        "flash_attn_with_kvcache": (lambda q, k, v: flash_attn.flash_attn_with_kvcache(
            q, k.clone(), v.clone(), cache_seqlens=seqlens), [qd, kc, vc], False),
        "cross_entropy": (lambda x: F.cross_entropy(x, t, reduction="sum", label_smoothing=0.1),
                          [rn(64, C, scale=2.0)], None),
        "fused_linear_cross_entropy": (lambda h, w: F.fused_linear_cross_entropy(h, w, tf, chunk_size=128),
                                       [rn(300, 64), rn(1000, 64, scale=0.3)], None),
        "perplexity": (lambda x: F.perplexity(x, t), [rn(64, C)], False),
        "swiglu": (lambda a, b: F.swiglu(a, b), [rn(rows, cols), rn(rows, cols)], None),
        "geglu": (lambda a, b: F.geglu(a, b), [rn(rows, cols), rn(rows, cols)], None),
    }


def _run_case(fn, inputs, grad, backend="cpu"):
    """Outputs and (unless grad is False) the gradients of every input for a fixed cotangent."""
    import llmfast

    args = [x.clone().requires_grad_(grad is not False) for x in inputs]
    with llmfast.backend(backend):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        if grad is False:
            return [o.detach() for o in outs]
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
        grads = torch.autograd.grad(outs, args, cot, allow_unused=True)
    return [o.detach() for o in outs] + [gr for gr in grads if gr is not None]


def _bitwise_equal(a, b):
    return all(x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
               for x, y in zip(a, b)) and len(a) == len(b)


def _compute_all():
    return {name: _run_case(*case) for name, case in _cases().items()}


def _cpu_backend_or_skip():
    from llmfast import backends
    why = backends.why_not("softmax", "cpu", "cpu")
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def serial():
    _cpu_backend_or_skip()
    return _compute_all()


def test_run_to_run(serial):
    again = _compute_all()
    bad = [name for name in serial if not _bitwise_equal(serial[name], again[name])]
    assert not bad, f"not reproducible run to run: {bad}"


def test_across_thread_counts(tmp_path):
    _cpu_backend_or_skip()
    # fused_linear_cross_entropy's matmuls are torch.mm: MKL splits a long reduction (the
    # vocabulary, for grad_input) across threads unless its strict CNR mode is on (seen on an
    # AVX-512 machine: [128, 1000] @ [1000, 64] differs between 1 and 2 threads without it)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               MKL_CBWR="AUTO,STRICT")
    results = {}
    for n in (1, 2, 3):
        out = tmp_path / f"threads{n}.pt"
        proc = subprocess.run([sys.executable, __file__, str(out), "--threads", str(n)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[n] = torch.load(out)
    bad = sorted({name for n in (2, 3) for name in results[1] if not _bitwise_equal(results[1][name], results[n][name])})
    assert not bad, f"results depend on the thread count (1 vs 2 vs 3): {bad}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_run_to_run_gpu_backends(backend):
    """The Triton and CUDA kernels, run to run: bitwise the same, forward and backward. They
    use no float atomics (a fixed reduction order); what a GPU would vary is the launch
    order, so this means most on a GPU (small shapes here: the interpreter and the warp
    emulator). It also catches a kernel that reads memory it never wrote (torch.empty
    buffers differ between runs). Splits sized by the SM count (the norms' dw/db partials,
    split-KV) may differ between GPU models, not between runs."""
    from llmfast import backends

    device = DEVICE
    ran = []
    for name, (fn, inputs, grad) in _cases(small=device == "cpu", device=device).items():
        try:
            first = _run_case(fn, inputs, grad, backend)
        except backends.BackendUnavailableError as e:
            if name == "softmax":  # the op every backend has: the backend itself is missing
                pytest.skip(str(e))
            continue
        assert _bitwise_equal(first, _run_case(fn, inputs, grad, backend)), f"{backend}: {name} not reproducible"
        ran.append(name)
    assert len(ran) >= 15, ran


def test_concurrent_threads(serial):
    """8 Python threads, each running every op: bitwise the serial results."""
    cases = _cases()
    got, errors = {}, []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            barrier.wait()
            got[i] = {name: _run_case(*cases[name]) for name in (list(cases)[i:] + list(cases)[:i])}
        except Exception as e:  # surfaced below: an exception in a thread would only print
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(got) == 8
    bad = sorted({name for res in got.values() for name in res if not _bitwise_equal(serial[name], res[name])})
    assert not bad, f"concurrent calls differ from serial ones: {bad}"


if __name__ == "__main__":
    # python tests/test_determinism.py OUT.pt --threads N
    out_path, threads = sys.argv[1], int(sys.argv[sys.argv.index("--threads") + 1])
    torch.set_num_threads(threads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.save(_compute_all(), out_path)

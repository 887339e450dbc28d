"""llmfast.models.GPT: loss, generation, convergence per backend, torch.compile, autocast."""
import math

import pytest
import torch

import llmfast
from llmfast.models import GPT, GPTConfig
from llmfast.train import ByteData, evaluate, make_optimizer, train_step

# The ops a GPT step runs; a backend takes part in the convergence test when it runs all of them.
GPT_OPS = ("layer_norm", "rms_norm", "attention", "fused_linear_cross_entropy", "softmax")


# tiny models: one thread (conftest.one_thread says why)
pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt_backends():
    out = []
    for name in llmfast.backends.BACKENDS:
        if name == "torch":
            continue
        whys = [llmfast.backends.why_not(op, name, "cpu") for op in GPT_OPS if op in llmfast.backends.OPS]
        why = next((w for w in whys if w), None)
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=f"{name}: {why}")] if why else []))
    return out


def tiny(**kw):
    cfg = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPTConfig(**cfg)


def test_loss_matches_logits_and_shapes():
    model = GPT(tiny())
    idx = torch.randint(0, 256, (3, 16))
    tgt = torch.randint(0, 256, (3, 16))
    tgt[0, :4] = -100   # ignored positions
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    none, loss = model(idx, tgt)
    assert none is None
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert abs(want.item() - math.log(256)) < 0.3  # a fresh model is close to uniform
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(n_embd=30, n_head=4)


@pytest.mark.parametrize("variant", [dict(norm="rmsnorm", pos_embedding="rope"), dict(bias=False, dropout=0.1)])
def test_variants_learn(variant):
    model = GPT(tiny(**variant))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (4, 16))
    first = None
    for _ in range(15):
        _, loss = model(idx, idx.roll(-1, 1))
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_rope_is_causal_and_position_aware():
    model = GPT(tiny(pos_embedding="rope")).eval()
    idx = torch.randint(0, 256, (1, 12))
    a, _ = model(idx)
    b, _ = model(torch.cat([idx[:, :8], torch.randint(0, 256, (1, 4))], 1))
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=1e-5)  # future tokens never leak back


def test_generate():
    model = GPT(tiny())
    idx = torch.randint(0, 256, (2, 5))
    greedy = model.generate(idx, 20, temperature=0)   # runs past block_size: the context is cropped
    assert greedy.shape == (2, 25) and torch.equal(greedy[:, :5], idx)
    torch.testing.assert_close(model.generate(idx, 20, top_k=1), greedy)
    g1 = model.generate(idx, 8, temperature=1.5, top_k=10, generator=torch.Generator().manual_seed(3))
    g2 = model.generate(idx, 8, temperature=1.5, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2) and g1.max() < 256
    assert model.training  # generate leaves the mode as it found it


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_kv_cache_matches_recompute(pos):
    # Batched greedy decoding through the KV cache (prefill, then one position per step)
    # gives the tokens that recomputing the whole context gives, including past block_size
    # (where the cache path re-runs the cropped context).
    model = GPT(tiny(pos_embedding=pos))
    idx = torch.randint(0, 256, (3, 5))
    steps = model.config.block_size + 4 - 5
    cached = model.generate(idx, steps, temperature=0, use_cache=True)
    plain = model.generate(idx, steps, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    g1 = model.generate(idx, 6, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=True)
    g2 = model.generate(idx, 6, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(g1, g2)


def _corpus():
    # Deterministic, learnable text: a few repeated lines of Python-ish bytes.
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    return "".join(lines).encode()


def _train_curve(backend, steps=50, **cfg):
    data = ByteData(_corpus(), 16, 0.1, seed=0)
    h = dict(steps=steps, batch_size=4, optimizer="adamw", lr=1e-2, min_lr=1e-3, warmup=5, weight_decay=0.0,
             momentum=0.9, grad_clip=1.0, eval_batches=2)
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=16, n_layer=1, **cfg))
    opt = make_optimizer(model, h)
    losses = []
    with llmfast.backend(backend):
        for step in range(steps):
            losses.append(train_step(model, opt, data, step, h, "cpu", None).item())
        val = evaluate(model, data, h, "cpu", None)
    return torch.tensor(losses), math.exp(val)


@pytest.mark.parametrize("backend", _gpt_backends())
def test_convergence_matches_torch(backend):
    ref_losses, ref_ppl = _train_curve("torch")
    losses, ppl = _train_curve(backend)
    assert ref_losses[-5:].mean() < ref_losses[:5].mean() - 1.0   # it learned something
    # The curves drift apart only by float rounding: a band, not bit-equality.
    assert (losses - ref_losses).abs().max() < 0.05, (losses - ref_losses).abs().max()
    assert abs(ppl / ref_ppl - 1) < 0.03, (ppl, ref_ppl)


def _train_steps(model, opt, idx, steps=3):
    """Next-token training steps on ``idx``; the losses."""
    losses = []
    for _ in range(steps):
        _, loss = model(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_torch_compile_fullgraph_trains():
    """fullgraph=True fails on any graph break; aot_eager also runs the fake and autograd
    registrations of every llmfast op (Inductor codegen adds nothing to that proof and takes
    minutes on 2 cores)."""
    torch._dynamo.reset()
    model = GPT(tiny())
    idx = torch.randint(0, 256, (2, 16))
    with llmfast.backend("cpu"):
        explain = torch._dynamo.explain(model)(idx, idx)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = _train_steps(compiled, opt, idx)
        _, eager = model(idx, idx.roll(-1, 1))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(torch.tensor(eager.item()), torch.tensor(compiled(idx, idx.roll(-1, 1))[1].item()),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor_trains():
    """The real thing: Inductor codegen around llmfast's opaque ops (about a minute on 2 cores)."""
    torch._dynamo.reset()
    model = GPT(tiny())
    idx = torch.randint(0, 256, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with llmfast.backend("cpu"):
        compiled = torch.compile(model, fullgraph=True)
        losses = _train_steps(compiled, opt, idx)
    assert losses[-1] < losses[0]


def test_autocast_bf16():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 256, (2, 16))
    tgt = idx.roll(-1, 1)
    _, ref = model(idx, tgt)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        _, loss = model(idx, tgt)
    assert logits.dtype == torch.bfloat16
    loss.float().backward()
    assert abs(loss.item() - ref.item()) < 0.05
    for p, g in zip(model.parameters(), ref_grads):
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
        assert (p.grad - g).norm() <= 0.1 * g.norm() + 1e-4

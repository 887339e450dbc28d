"""llmfast.patch: torch.nn modules and tiny random-config Hugging Face models.

After patching, outputs and the gradient of every parameter match the unpatched
model (same weights, dropout 0); the handle reports what was swapped; undo restores
the original classes, modules and attention implementation.
"""
import copy

import pytest
import torch

import llmfast
from llmfast.patch import RULES

ATOL, RTOL = 2e-5, 1e-4


# tiny models: one thread (conftest.one_thread says why)
pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_match(got, ref):
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {n}: {m}")


class Zoo(torch.nn.Module):
    """One of each patchable torch.nn module, with a LayerNorm shared by two parents."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.rms = torch.nn.RMSNorm(d, eps=1e-6)
        self.mha = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.enc = torch.nn.TransformerEncoderLayer(d, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.LogSoftmax(-1))
        self.gate = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Softmax(dim=-1))
        self.shared = torch.nn.ModuleList([self.ln])

    def forward(self, x):
        x = self.rms(self.ln(x))
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = self.enc(x)
        x = self.shared[0](x)
        return self.head(x) + self.gate(x)


def _zoo_backends():
    out = []
    for name in llmfast.backends.BACKENDS:
        whys = [llmfast.backends.why_not(op, name, "cpu") for op in ("attention", "layer_norm", "rms_norm", "softmax")]
        why = next((w for w in whys if w), None)
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=f"{name}: {why}")] if why else []))
    return out


@pytest.mark.parametrize("backend", _zoo_backends())
def test_torch_modules_match_and_undo(backend):
    with llmfast.backend(backend):
        _torch_modules_match_and_undo()


def _torch_modules_match_and_undo():
    model = Zoo()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 16)
    params_before = {n: p for n, p in model.named_parameters()}
    classes_before = {n: type(m) for n, m in model.named_modules()}

    handle = llmfast.patch(model)
    swapped = {s.path: s.target for s in handle.swapped}
    assert swapped["ln"].endswith(".LayerNorm") and swapped["shared.0"].endswith(".LayerNorm")
    assert swapped["rms"].endswith(".RMSNorm")
    assert swapped["enc"] == "llmfast.nn.transformer.TransformerEncoderLayer"
    assert swapped["head.1"].endswith("LogSoftmax") and swapped["gate.1"].endswith("Softmax")
    assert swapped["mha"].endswith("MultiheadAttention") and swapped["enc.self_attn"].endswith("MultiheadAttention")
    assert swapped["enc.norm1"].endswith("LayerNorm")
    assert not handle.skipped, handle.report()
    for name, m in model.named_modules():
        if name in swapped:
            assert type(m) is getattr(llmfast.nn, type(m).__name__), name
    # Same parameter objects: an optimizer built before patching still drives the model.
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert "swapped" in handle.report()

    for train in (True, False):
        model.train(train)
        ref.train(train)
        model.zero_grad()
        ref.zero_grad()
        out, want = model(x), ref(x)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
        out.square().sum().backward()
        want.square().sum().backward()
        _assert_grads_match(_grads(model), _grads(ref))

    handle.undo()
    assert {n: type(m) for n, m in model.named_modules()} == classes_before
    torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    handle.undo()  # idempotent


def test_ops_filter_subclasses_and_instance_forward():
    class MyLN(torch.nn.LayerNorm):  # a user subclass may override forward: never retyped
        pass

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), MyLN(8), torch.nn.Softmax(-1), torch.nn.LayerNorm(8))
    model[3].forward = lambda x: x  # e.g. accelerate hooks replace forward on the instance
    handle = llmfast.patch(model, ops=["layer_norm"])
    assert [s.path for s in handle.swapped] == ["0"]
    assert type(model[1]) is MyLN and type(model[2]) is torch.nn.Softmax
    assert [p for p, _ in handle.skipped] == ["3"]
    handle.undo()
    assert type(model[0]) is torch.nn.LayerNorm
    with pytest.raises(ValueError, match="unknown op"):
        llmfast.patch(model, ops=["layernorm"])
    with pytest.raises(TypeError):
        llmfast.patch(object())


def test_context_manager_and_double_patch():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8))
    with llmfast.patch(model) as h:
        assert len(h.swapped) == 1
        assert len(llmfast.patch(model).swapped) == 0  # already llmfast: nothing matches twice
    assert type(model[0]) is torch.nn.LayerNorm


def test_table_is_declarative():
    # every family of op is a row (no per-model function), and every target names an llmfast module
    assert {r.carry for r in RULES} <= {"retype", "rebuild", "attn_implementation"}
    for r in RULES:
        if r.carry != "attn_implementation":
            assert hasattr(llmfast.nn, r.target), f"llmfast.nn.{r.target} missing for {r}"


# ----------------------------------------------------------------------------------
# Hugging Face transformers: tiny random configs, no downloads

transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
HF_CONFIGS = {
    "llama": lambda T: T.LlamaConfig(**_COMMON),
    "mistral": lambda T: T.MistralConfig(**_COMMON, sliding_window=6),   # the window is in reach: masks differ
    "qwen2": lambda T: T.Qwen2Config(**_COMMON),
    "qwen3": lambda T: T.Qwen3Config(**_COMMON, head_dim=8),
    "mixtral": lambda T: T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": lambda T: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("backend", _zoo_backends())
def test_hf_llama_each_backend(backend, monkeypatch):
    with llmfast.backend(backend):
        test_hf_model_logits_grads_and_undo("llama", monkeypatch)


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_hf_model_logits_grads_and_undo(family, monkeypatch):
    from llmfast import hf

    calls = []
    real = hf.attention_forward
    monkeypatch.setattr(hf, "attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    config = HF_CONFIGS[family](transformers)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the mask path, not just is_causal
    keep = mask.bool()

    norms_before = {n: m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    handle = llmfast.patch(model)
    report = handle.report()
    assert model.config._attn_implementation == "llmfast", report
    kinds = {s.carry for s in handle.swapped}
    assert kinds == {"attn_implementation", "retype" if family == "gpt2" else "rebuild"}, report
    assert all(type(m) is getattr(llmfast.nn, type(m).__name__, None)
               for n, m in model.named_modules() if n in norms_before)

    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    want = ref(input_ids=ids, attention_mask=mask, labels=ids)
    assert calls, "the llmfast attention function was never called"
    torch.testing.assert_close(out.logits[keep], want.logits[keep], atol=ATOL, rtol=RTOL)
    out.loss.backward()
    want.loss.backward()
    _assert_grads_match(_grads(model), _grads(ref))

    handle.undo()
    assert model.config._attn_implementation == "sdpa"
    for n, m in norms_before.items():
        assert model.get_submodule(n) is m and type(m) is type(ref.get_submodule(n))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)


def test_hf_generate_with_cache_matches():
    # decoding: one query token against a KV cache (q_len 1, no causal flag), GQA heads
    config = HF_CONFIGS["llama"](transformers)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (1, 5))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with llmfast.patch(model):
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)

"""llmfast.patch: torch.nn modules and tiny random-config Hugging Face models.

After patching, outputs and the gradient of every parameter match the unpatched
model (same weights, dropout 0); the handle reports what was swapped; undo restores
the original classes, modules and attention implementation.
"""
import copy

import pytest
import torch

import llmfast
from llmfast.patch import HF_ATTENTION_MODEL_TYPES, HF_ROPE_MODEL_TYPES, RULES, _target_module_class

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
        ops = ("attention", "layer_norm", "rms_norm", "softmax", "rope")
        whys = [llmfast.backends.why_not(op, name, "cpu") for op in ops]
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
    assert {r.carry for r in RULES} <= {"retype", "rebuild", "subclass", "attn_implementation", "module_function"}
    for r in RULES:
        if r.carry in ("retype", "rebuild"):
            assert _target_module_class(r.target) is not None, f"{r.target} missing for {r}"
        if r.carry == "subclass":
            assert r.target in llmfast.patch.OPS and r.build is not None


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
    "gemma": lambda T: T.GemmaConfig(**_COMMON, head_dim=8),
    # a soft-cap of 3 on logits of size ~1-3: far from linear, so a wrong tanh derivative shows
    "gemma2": lambda T: T.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=3.0, sliding_window=6),
    # a local layer (window 6, its own rope theta) then a global one; q/k norms; scaling from
    # query_pre_attn_scalar 32, not head_dim 8
    "gemma3_text": lambda T: T.Gemma3TextConfig(**_COMMON, head_dim=8, final_logit_softcapping=3.0, sliding_window=6,
                                                query_pre_attn_scalar=32,
                                                layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda T: T.Phi3Config(**_COMMON, pad_token_id=0),
    "gpt2": lambda T: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("backend", _zoo_backends())
def test_hf_llama_each_backend(backend, monkeypatch):
    with llmfast.backend(backend):
        test_hf_model_logits_grads_and_undo("llama", monkeypatch)


@pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread says why)
@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_hf_model_logits_grads_and_undo(family, monkeypatch):
    from llmfast import hf

    calls = []
    real = hf.attention_forward
    monkeypatch.setattr(hf, "attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    impl = "eager" if family == "gemma2" else "sdpa"  # transformers: no SDPA for Gemma 2 (attention soft-cap)
    model, ref = _hf_pair(family, attn_implementation=impl)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the mask path, not just is_causal
    keep = mask.bool()
    labels = ids.masked_fill(~keep, -100)
    # Row 1's last padded position predicts its first real token (transformers' label shift), but that
    # position sees no key: eager gives it a uniform average, SDPA and llmfast zeros (llmfast.hf says
    # why). Its prediction is garbage either way, so it stays out of the compared loss.
    labels[1, 3] = -100

    norms_before = {n: m for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    handle = llmfast.patch(model)
    report = handle.report()
    attention = family in HF_ATTENTION_MODEL_TYPES
    assert (model.config._attn_implementation == "llmfast") == attention, report
    kinds = {s.carry for s in handle.swapped}
    want_kinds = {"retype" if family == "gpt2" else "rebuild"} | ({"attn_implementation"} if attention else set())
    want_kinds |= set() if family == "gpt2" else {"subclass"}  # GPT-2's head is not in the loss table
    want_kinds |= {"module_function"} if family in HF_ROPE_MODEL_TYPES else set()  # rotary (GPT-2 has none)
    assert kinds == want_kinds, report
    # every norm of the block (Qwen3's q_norm/k_norm included) is llmfast's now
    assert norms_before and all(type(model.get_submodule(n)).__module__.startswith("llmfast") for n in norms_before)
    assert all(type(m).__name__ in report for m in norms_before.values()), report  # report lists each piece

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert (out.logits is None) == (family != "gpt2")  # the fused loss never formed them
    assert not attention or calls, "the llmfast attention function was never called"
    torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL)
    out.loss.backward()
    want.loss.backward()
    _assert_grads_match(_grads(model), _grads(ref))
    with torch.no_grad():  # evaluation: logits as usual, the family's loss
        out, want = model(input_ids=ids, attention_mask=mask, labels=labels), ref(input_ids=ids, attention_mask=mask,
                                                                                   labels=labels)
    torch.testing.assert_close(out.logits[keep], want.logits[keep], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL)

    handle.undo()
    assert model.config._attn_implementation == impl and type(model) is type(ref)
    for n, m in norms_before.items():
        assert model.get_submodule(n) is m and type(m) is type(ref.get_submodule(n))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)


@pytest.mark.skipif(llmfast.available("rope", "cpu")["cpu"] is not None, reason="llmfast._C not built")
@pytest.mark.parametrize("family", HF_ROPE_MODEL_TYPES)
def test_hf_rotary_runs_the_llmfast_kernel_and_undo_restores(family):
    import importlib

    package = family.removesuffix("_text")  # gemma3_text: Gemma3ForCausalLM lives in models.gemma3
    modeling = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    original = modeling.apply_rotary_pos_emb
    model, ref = _hf_pair(family, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = ref(input_ids=ids, labels=ids).loss
    first = llmfast.patch(model, ops="rope")
    assert [s.carry for s in first.swapped] == ["module_function"], first.report()
    assert "apply_rotary_pos_emb" in first.report()
    assert modeling.apply_rotary_pos_emb is not original
    second = llmfast.patch(ref, ops="rope")  # a second holder of the same module-level function
    with llmfast.backend("cpu"), torch.profiler.profile() as prof:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), want, atol=ATOL, rtol=RTOL)
    ran = {e.key for e in prof.key_averages()}
    assert {"llmfast::rope_fwd", "llmfast::rope_bwd"} <= ran, sorted(k for k in ran if "llmfast" in k)
    first.undo()
    assert modeling.apply_rotary_pos_emb is not original  # still held by the second patch
    second.undo()
    assert modeling.apply_rotary_pos_emb is original
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(input_ids=ids)
    assert "llmfast::rope_fwd" not in {e.key for e in prof.key_averages()}


def _hf_pair(family, **kw):
    """A tiny random model of ``family`` in training mode and an identical copy. Norm weights are
    randomised: their initial values (ones, or Gemma's zeros) would hide a wrong formula."""
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](transformers), **kw).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    return model, copy.deepcopy(model)


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, _grads(model)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_hf_causal_lm_loss_options(family, monkeypatch):
    # HF's loss options, through the fused path: shift_labels, num_items_in_batch (gradient
    # accumulation's sum / count), logits_to_keep, return_dict=False; and the fused path
    # never calls lm_head (no [B, L, V] logits), which is checked by making it raise.
    model, ref = _hf_pair(family, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    cases = [dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(7)),
             dict(labels=labels, shift_labels=shifted.roll(1, -1)),
             dict(labels=labels, shift_labels=shifted[:, -4:].contiguous(), logits_to_keep=4)]
    handle = llmfast.patch(model, ops=["fused_linear_cross_entropy", "rms_norm"])
    monkeypatch.setattr(model.lm_head, "forward", lambda *a: pytest.fail("lm_head ran: logits were formed"))
    for kw in cases:
        out, grads = _loss_and_grads(model, input_ids=ids, **kw)
        want, ref_grads = _loss_and_grads(ref, input_ids=ids, **kw)
        assert out.logits is None and out.loss.dtype == want.loss.dtype == torch.float32
        torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL, msg=lambda m: f"{kw}: {m}")
        _assert_grads_match(grads, ref_grads)
    loss, *rest = model(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(loss, ref(input_ids=ids, labels=labels).loss, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="does not match"):  # as HF: labels must match the kept positions
        model(input_ids=ids, labels=labels, logits_to_keep=4)
    handle.undo()
    assert "forward" in model.lm_head.__dict__  # our monkeypatch, not the patch's


def test_hf_causal_lm_bias_and_moe_aux_loss():
    # an lm_head with a bias (none of the families has one; a user head may), and Mixtral's
    # router load-balancing loss added to the fused loss
    model, ref = _hf_pair("mixtral", attn_implementation="eager")
    for m in (model, ref):
        torch.manual_seed(1)
        head = torch.nn.Linear(32, 64, bias=True)
        head.weight = m.lm_head.weight  # stays tied to the embedding
        m.lm_head = head
    ids = torch.randint(0, 64, (2, 9))
    with llmfast.patch(model) as handle:
        assert "fused_linear_cross_entropy" in handle.report()
        out, grads = _loss_and_grads(model, input_ids=ids, labels=ids, output_router_logits=True)
        want, ref_grads = _loss_and_grads(ref, input_ids=ids, labels=ids, output_router_logits=True)
        assert "lm_head.bias" in grads and out.aux_loss is not None and out.router_logits is not None
        torch.testing.assert_close(out.aux_loss, want.aux_loss, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL)
        _assert_grads_match(grads, ref_grads)
        assert len(llmfast.patch(model).swapped) == 0  # already patched: nothing matches twice
        assert type(model).__name__ == "MixtralForCausalLM"  # save_pretrained's architecture name
    assert type(model) is type(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_gemma_norm_semantics(dtype):
    # Gemma: (x / rms(x)) * (1 + w) computed in fp32 and rounded once (Llama rounds before
    # multiplying); the patched module trains the model's own Parameter
    from llmfast.hf import OffsetRMSNorm

    G = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    old = G.GemmaRMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        old.weight.normal_(0, 0.5)
    x = (torch.randn(3, 5, 24) * 4).to(dtype)
    model = torch.nn.Sequential(old)
    handle = llmfast.patch(model)
    new = model[0]
    assert isinstance(new, OffsetRMSNorm) and new.weight is old.weight and new.state_dict().keys() == {"weight"}
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, want = new(xg), old(xr)
    assert y.dtype == dtype
    # fp32: the same formula to rounding; bf16: both round once from fp32, so at most one ulp apart
    torch.testing.assert_close(y, want, atol=1e-5 if dtype == torch.float32 else 0, rtol=1e-5 if dtype ==
                               torch.float32 else 2 ** -7)
    g = torch.randn_like(y)
    (gw_new,) = torch.autograd.grad(y, new.weight, g)
    (gw_old,) = torch.autograd.grad(want, old.weight, g)
    torch.testing.assert_close(gw_new, gw_old, atol=1e-4, rtol=1e-3 if dtype == torch.float32 else 2e-2)
    handle.undo()
    assert model[0] is old


def test_hf_generate_with_cache_matches():
    # decoding: one query token against a KV cache (q_len 1, no causal flag), GQA heads
    config = HF_CONFIGS["llama"](transformers)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 64, (1, 5))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with llmfast.patch(model):
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)

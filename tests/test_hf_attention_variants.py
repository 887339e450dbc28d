"""transformers' attention options through ``llmfast.patch(model, ops="attention")`` (issues 11, 12):
Mistral's ``sliding_window``, Gemma 2's ``softcap`` (attn_logit_softcapping) with local
layers, gpt-oss's ``s_aux`` sinks, Gemma 3's local/global layers (each with its own rope,
q/k norms). Tiny random configs, with and without a left-padded row: the logits of every
real position and every parameter gradient (from real positions) match the eager
implementation; padded positions see no key and differ by design (``llmfast.hf.attention_forward``
says why; the last test pins both rules on one call). The patch reports the swap and undo
restores eager."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmfast  # noqa: E402
from llmfast import hf  # noqa: E402
from llmfast.patch import HF_ATTENTION_MODEL_TYPES  # noqa: E402

# tiny models: one thread (conftest.one_thread says why)
pytestmark = pytest.mark.usefixtures("one_thread")

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
CONFIGS = {
    # windows of 4 and 5 on 12 tokens: the window is in reach on every layer
    "mistral": lambda T: T.MistralConfig(**_COMMON, sliding_window=4),
    # a soft-cap of 1.5 on attention scores of size ~1: far from linear
    "gemma2": lambda T: T.Gemma2Config(**_COMMON, head_dim=8, attn_logit_softcapping=1.5, sliding_window=5,
                                       final_logit_softcapping=None, query_pre_attn_scalar=8),
    "gpt_oss": lambda T: getattr(T, "GptOssConfig")(**_COMMON, head_dim=8, num_local_experts=4,
                                                    num_experts_per_tok=2, sliding_window=4,
                                                    layer_types=["sliding_attention", "full_attention"]),
    # a local layer (window 5, rope theta 10^4) then a global one (theta 10^6); scaling from
    # query_pre_attn_scalar 32, not head_dim 8
    "gemma3_text": lambda T: getattr(T, "Gemma3TextConfig")(**_COMMON, head_dim=8, sliding_window=5,
                                                            query_pre_attn_scalar=32,
                                                            layer_types=["sliding_attention", "full_attention"]),
}


def _model(family):
    name = {"gpt_oss": "GptOssConfig", "gemma3_text": "Gemma3TextConfig"}.get(family)
    if name and not hasattr(transformers, name):
        pytest.skip(f"this transformers has no {name}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](transformers),
                                                          attn_implementation="eager").train()
    with torch.no_grad():  # sinks start at zero: random ones make them matter
        for n, p in model.named_parameters():
            if n.endswith("sinks"):
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_hf_attention_options_match_eager(family, padded, monkeypatch):
    calls = []
    real = hf.attention_forward
    monkeypatch.setattr(hf, "attention_forward", lambda *a, **k: calls.append(sorted(k)) or real(*a, **k))
    ref = _model(family)
    model = copy.deepcopy(ref)
    assert family in HF_ATTENTION_MODEL_TYPES
    handle = llmfast.patch(model, ops="attention")
    assert model.config._attn_implementation == "llmfast"
    assert "attn_implementation='eager' -> attn_implementation='llmfast'" in handle.report(), handle.report()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    keep = mask.bool()
    out = model(input_ids=ids, attention_mask=mask)
    want = ref(input_ids=ids, attention_mask=mask)
    assert calls, "the llmfast attention function was never called"
    torch.testing.assert_close(out.logits[keep], want.logits[keep], atol=2e-5, rtol=1e-4)
    cot = torch.randn_like(want.logits) * keep.unsqueeze(-1)
    (out.logits * cot).sum().backward()
    (want.logits * cot).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    if family == "gpt_oss":
        assert any(n.endswith("sinks") for n in grads)  # the sinks are trained through the kernel
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=5e-5, rtol=1e-3, msg=n)
    handle.undo()
    assert model.config._attn_implementation == "eager"


def test_padded_query_rows_are_zeros_where_eager_averages():
    # the documented difference (llmfast.hf.attention_forward): a left-padded query sees no key and
    # gets zeros (FlashAttention's and SDPA's rule); eager's softmax over scores the mask's minimum
    # swallowed gives the uniform average of every value; the real rows agree
    from types import SimpleNamespace

    from transformers.masking_utils import sdpa_mask
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    B, H, Hkv, L, D = 2, 4, 2, 7, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g)
    k, v = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(2))
    padding = torch.ones(B, L, dtype=torch.bool)
    padding[1, :3] = False
    mask = sdpa_mask(batch_size=B, q_length=L, kv_length=L, attention_mask=padding, allow_is_causal_skip=False)
    module = SimpleNamespace(is_causal=True, head_dim=D, num_key_value_groups=H // Hkv, training=False)
    out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3, softcap=1.5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3, softcap=1.5)
    assert out.shape == want.shape == (B, L, H, D)
    torch.testing.assert_close(out[padding], want[padding], atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1, :3], torch.zeros(3, H, D))
    uniform = v[1].mean(1).repeat_interleave(H // Hkv, 0)   # [H, D]: every key's value, equally weighted
    torch.testing.assert_close(want[1, :3], uniform.expand(3, H, D), atol=1e-6, rtol=1e-5)

"""Patched Hugging Face models decode through llmfast's split-KV kernel (llmfast.ops.kvcache).

``attn_implementation="llmfast"`` hands a block of few query tokens against a longer key
sequence (the model's DynamicCache / StaticCache after its update) to the kvcache kernel,
translating transformers' mask into the kernel's rule (left padding -> kv_start, the
filled length -> seqlens, a sliding window -> window) and falling back to the general
attention path when no rule reproduces the mask. Checked here: batched greedy generation
with left padding gives eager's tokens (tiny Llama, Mistral, Gemma 2 and Gemma 3, dynamic and
static caches);
one decode call against a float64 reference with the FlashAttention rule on every backend;
masks the kernel cannot state fall back, still exact. A dispatch-mode spy counts the
kvcache kernel's calls: it observes the real op, it does not replace it.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llmfast
from llmfast import hf
from llmfast.testing import check

from conftest import DEVICE, backends_for

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function  # noqa: E402

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda T: T.LlamaConfig(**_COMMON),
    # a window of 4 on 7 + 10 tokens: in reach at every decode step (the cache's layers slide)
    "mistral": lambda T: T.MistralConfig(**_COMMON, sliding_window=4),
    # local/global layers (each with its own cache layer), Gemma's scaling, Gemma 2's soft-cap
    "gemma2": lambda T: T.Gemma2Config(**_COMMON, head_dim=8, attn_logit_softcapping=1.5, sliding_window=4,
                                       query_pre_attn_scalar=32),
    "gemma3_text": lambda T: T.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=32,
                                                layer_types=["sliding_attention", "full_attention"]),
}


class KVCacheCalls(TorchDispatchMode):
    """Counts the calls of the kvcache kernel (native, emulated or Triton) that run inside it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split("::")[-1].startswith("kvcache_fwd"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread says why)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_batched_greedy_generation_matches_eager(family, cache):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](transformers),
                                                          attn_implementation="eager").eval()
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding of different lengths: kv_start differs per row
    mask[2, :5] = 0
    new = 10
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              cache_implementation=cache)
    want = model.generate(ids, **kw)
    with llmfast.patch(model), KVCacheCalls() as spy:
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    # every decode step (all but the first token, which prefill gives) of every layer ran the kernel
    assert spy.calls >= model.config.num_hidden_layers * (new - 1), spy.calls


class _Attention(torch.nn.Module):
    is_causal = True


def _attend(q_len, window):
    def fn(q, k, v, m):
        return hf.attention_forward(_Attention(), q, k, v, m, scaling=0.3, sliding_window=window)[0]
    return fn


def _inputs(B, q_len, S, dtype, pad, window, Hq=8, Hkv=2, D=24):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).to(DEVICE)
               for H, L in ((Hq, q_len), (Hkv, S), (Hkv, S)))
    padding = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(pad):
        padding[b, :p] = False
    fn = sliding_window_causal_mask_function(window) if window else None
    extra = {"mask_function": fn} if fn else {}
    mask = sdpa_mask(batch_size=B, q_length=q_len, kv_length=S, q_offset=S - q_len, attention_mask=padding,
                     allow_is_causal_skip=False, **extra)
    return q, k, v, mask.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,S,window,pad", [(1, 37, None, (0, 5, 36)), (3, 70, None, (9, 0, 2)),
                                                (1, 41, 6, (0, 3, 38)), (4, 19, 5, (1, 0, 17))])
@pytest.mark.parametrize("backend", backends_for("kvcache", emu=True))
def test_decode_call_matches_reference(backend, q_len, S, window, pad, dtype):
    inputs = _inputs(3, q_len, S, dtype, pad, window)
    with KVCacheCalls() as spy:
        # float64 reference: the general path (the kernel takes no float64), then torch and `backend`
        check(_attend(q_len, window), inputs, backend, grad=False)
    assert spy.calls == (0 if backend == "torch" else 1)


def _rule_cases():
    q, k, v, mask = _inputs(2, 2, 30, torch.float32, (0, 4), None)
    hole = mask.clone()
    hole[0, :, :, 10:13] = False                  # padding inside the sequence
    per_head = mask.expand(2, 8, 2, 30).clone()   # one mask per head
    per_head[:, 1, :, 0] = False
    return {"hole": (q, k, v, hole), "per_head": (q, k, v, per_head),
            "float_bias": (q, k, v, torch.zeros(2, 1, 2, 30).masked_fill(~mask, float("-inf")).to(DEVICE))}


@pytest.mark.parametrize("case", ["hole", "per_head", "float_bias"])
def test_masks_the_kernel_cannot_state_fall_back(case):
    q, k, v, mask = _rule_cases()[case]
    assert hf._decode_visibility(mask, 2, 2, 30, False, None, q.device) is None
    with KVCacheCalls() as spy:
        out = _attend(2, None)(q, k, v, mask)
    assert spy.calls == 0
    m = mask if mask.dtype == torch.bool else mask == 0
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m,
                                                           scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_training_and_long_query_blocks_keep_the_general_path():
    q, k, v, mask = _inputs(2, 3, 20, torch.float32, (0, 2), None)
    with KVCacheCalls() as spy:
        _attend(3, None)(q.requires_grad_(), k, v, mask).sum().backward()   # needs a gradient
        assert q.grad is not None and spy.calls == 0
        q, k, v, mask = _inputs(2, hf.DECODE_MAX_QUERIES + 1, 40, torch.float32, (0, 2), None)
        _attend(q.shape[2], None)(q, k, v, mask)
        assert spy.calls == 0
        _attend(q.shape[2], None)(q[:, :, -hf.DECODE_MAX_QUERIES:], k, v, mask[:, :, -hf.DECODE_MAX_QUERIES:])
        assert spy.calls == 1

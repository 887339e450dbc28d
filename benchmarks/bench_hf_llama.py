"""One training step of a Hugging Face Llama, as transformers ships it vs ``llmfast.patch``-ed.

The step: ``zero_grad``, ``model(input_ids, labels=labels).loss``, ``backward``,
``AdamW.step`` on a randomly initialised ``LlamaForCausalLM`` (fp32; built from a
config, no download). ``torch`` is the unpatched model (SDPA attention, HF's loss over
the full [B·L, V] logits); ``llmfast:<backend>`` the same weights patched (RMSNorms,
attention, and the loss through ``fused_linear_cross_entropy``, which never forms the
logits) with that backend chosen. Throughput is tokens/s (B·L per step).

Peak memory (MEMORY = True, ``llmfast.bench.peak_memory_mb``): on CPU the step's peak
resident set above the resident set before it (VmHWM reset through
/proc/self/clear_refs, glibc serving every large block by mmap so a freed tensor leaves
the resident set at once), measured on a step after the first, so the parameters and
AdamW's state are not counted but everything the step allocates (activations, logits,
gradients) is. On CUDA the caching allocator's peak above what was allocated before.

The unfused loss holds, for V = 32000 and B·L = 2048 tokens, the fp32 logits (262 MB),
their log-softmax (262 MB) and in backward two more tensors of that size; the fused one
a [256, V] chunk (33 MB) and an fp32 copy of the head's gradient.

Measured (main at 1a0939d, with the RMSNorm, attention, gated-MLP and loss patches; CPU,
2 shared cores; ``llmfast bench --op hf_llama --rounds 5``): peak 1149.3 -> 569.1 MB
(0.50x), 202.4 -> 215.7 tokens/s (1.07x). What remains of the patched peak is mostly the
layers' saved activations and the parameter gradients (182 MB here), plus the loss's
fp32 head gradient, saved in forward and copied once by the backward's scaling (65 MB
each); the time is the matmuls', the same FLOPs in both.
"""
import contextlib

import torch

from llmfast import backends

OP = "hf_llama"
PROVIDER_OP = "fused_linear_cross_entropy"   # the llmfast:<backend> providers: where the loss can run
MEMORY = True

# (B, L, hidden, layers, heads, intermediate, vocab)
_FULL = [(4, 512, 512, 4, 8, 1376, 32000)]
_QUICK = [(2, 64, 128, 2, 4, 344, 4000)]


def cases(quick, device, dtypes):
    from llmfast import hf

    if not hf.available():  # transformers is optional (the GPU machine may lack it): no cases then
        return []
    out = []
    for B, L, H, n_layer, heads, inter, V in (_QUICK if quick else _FULL):
        for dt in dtypes:
            if dt != torch.float32:
                continue  # the training step of an fp32 model; bf16 training would use autocast
            out.append(dict(name=f"train step B={B} L={L} H={H} layers={n_layer} V={V}", B=B, L=L, H=H,
                            n_layer=n_layer, heads=heads, inter=inter, V=V, dtype=dt))
    return out


def providers(case, device):
    return []


def work(case):
    return "tokens/s", case["B"] * case["L"]


def _model(case, device, dtype=torch.float32):
    import transformers

    config = transformers.LlamaConfig(vocab_size=case["V"], hidden_size=case["H"], intermediate_size=case["inter"],
                                      num_hidden_layers=case["n_layer"], num_attention_heads=case["heads"],
                                      num_key_value_heads=case["heads"], max_position_embeddings=case["L"])
    torch.manual_seed(0)  # the same weights for every provider
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).train()


def _batch(case, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, case["V"], (case["B"], case["L"]), generator=g)
    labels = ids.clone()
    labels[:, : case["L"] // 8] = -100   # a prompt whose tokens are not trained on
    return ids.to(device), labels.to(device)


def setup(provider, case, device):
    import llmfast

    model = _model(case, device)
    which = None
    if provider != "torch":
        llmfast.patch(model)
        which = provider.split(":", 1)[1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels = _batch(case, device)
    cuda = torch.device(device).type == "cuda"

    def step():
        with backends.backend(which) if which else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return loss.detach()
    return step


def reference(case, device):
    """The first step's loss (the weights before any update) in float64 throughout (HF's own
    loss would upcast the logits to fp32 only, so it is taken here from the fp64 logits)."""
    model = _model(case, device, torch.float64)
    ids, labels = _batch(case, device)
    with torch.no_grad():
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, case["V"]), labels[:, 1:].reshape(-1))


def checks():
    return []   # correctness: tests/test_patch.py and tests/test_hf_convergence.py

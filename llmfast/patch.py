"""``llmfast.patch(model)``: swap a model's modules for llmfast's, in place, weights kept.

One declarative table, :data:`RULES`, says what is swapped: each row names the
llmfast op family it belongs to (for ``ops=``), what it matches, what replaces it
and how the weights and configuration are carried over. There is no function per
model: a new Hugging Face family whose modules follow a known convention is one
more name in a row.

Three ways to carry a module over (the ``carry`` column):

``retype``
    The llmfast module is a subclass of the torch one with the same state (same
    constructor, parameters, buffers, ``state_dict`` keys), so the object keeps
    everything it has (parameters, optimizer references, hooks, device, dtype)
    and only its class changes: the forward becomes llmfast's. Undo sets the class
    back. Only exact class matches are retyped: a user subclass may override
    ``forward``, and retyping would silently drop that override.
``rebuild``
    The replacement is a different class (a Hugging Face ``LlamaRMSNorm`` becomes
    ``llmfast.nn.RMSNorm``): a new module is built from the old one's
    configuration and *shares* its parameter objects, then takes the old one's
    place in every parent that holds it. Undo puts the old module back.
``subclass``
    A Hugging Face ``<Family>ForCausalLM`` is retyped to a subclass of its own class
    (made once per class by :func:`llmfast.hf.causal_lm_class`, same name) whose
    training forward with ``labels`` takes the loss through
    ``fused_linear_cross_entropy`` instead of materialising the logits. The object
    keeps everything it has; undo sets the class back.
``module_function``
    Hugging Face attention calls the rotary embedding as a module-level function of its
    modelling file (``transformers.models.<family>.modeling_<family>.apply_rotary_pos_emb``):
    that attribute is pointed at llmfast's (:func:`llmfast.hf.route`). It is global to the
    process, so every model of the family uses llmfast's rotary while some patch holds it;
    undo of the last such patch restores the original function object.
``attn_implementation``
    Hugging Face attention is a function looked up by name at every call:
    ``"llmfast"`` is registered with transformers' ``AttentionInterface`` (and
    the SDPA mask builder for it) and the model config's ``_attn_implementation``
    is pointed at it. Undo restores the previous name on every config touched.

A module whose ``forward`` was replaced on the instance (accelerate's hooks do
this) is left alone and reported as skipped: changing its class would not reach
the forward that runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

__all__ = ["patch", "PatchHandle", "Rule", "RULES", "OPS"]


# ----------------------------------------------------------------------------------
# Matchers: what a row applies to


@dataclass(frozen=True)
class TorchClass:
    """Exactly the class ``torch.nn.<name>`` (absent in older torch: the row is inert)."""

    name: str

    def cls(self):
        return getattr(torch.nn, self.name, None)

    def matches(self, module) -> bool:
        cls = self.cls()
        return cls is not None and type(module) is cls

    def __str__(self):
        return f"torch.nn.{self.name}"


@dataclass(frozen=True)
class HFClass:
    """A transformers module class whose name fully matches ``pattern``.

    Matched by name so that transformers is never imported to read the table, and so
    that one row covers a family of identical classes (``LlamaRMSNorm``,
    ``MistralRMSNorm``, ...). Only families whose class follows the convention the
    ``carry`` function assumes belong in the pattern (Gemma's RMSNorm scales by
    ``1 + weight``: it has its own row).
    """

    pattern: str

    def matches(self, module) -> bool:
        t = type(module)
        return t.__module__.startswith("transformers.") and re.fullmatch(self.pattern, t.__name__) is not None

    def __str__(self):
        return f"transformers:{self.pattern}"


@dataclass(frozen=True)
class HFModel:
    """A transformers ``PreTrainedModel`` whose ``config.model_type`` is listed."""

    model_types: tuple

    def matches(self, module) -> bool:
        config = getattr(module, "config", None)
        return (type(module).__module__.startswith("transformers.")
                and getattr(config, "model_type", None) in self.model_types
                and hasattr(config, "_attn_implementation"))

    def __str__(self):
        return f"transformers models of type {'/'.join(self.model_types)}"


@dataclass(frozen=True)
class HFCausalLM:
    """A transformers ``<Family>ForCausalLM`` of a listed ``config.model_type``, not yet patched."""

    model_types: tuple

    def matches(self, module) -> bool:
        t = type(module)
        return (t.__module__.startswith("transformers.") and t.__name__.endswith("ForCausalLM")
                and "_llmfast_base" not in t.__dict__
                and getattr(getattr(module, "config", None), "model_type", None) in self.model_types)

    def __str__(self):
        return f"transformers <Family>ForCausalLM of type {'/'.join(self.model_types)}"


# ----------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Rule:
    op: str                  # llmfast op family, the unit of ``ops=``
    source: object           # a matcher: TorchClass / HFClass / HFModel
    target: str              # ``llmfast.nn.<target>`` (or ``module:Class``) for modules, the implementation
                             # name for attention, the op for a subclass
    carry: str               # "retype" | "rebuild" | "subclass" | "attn_implementation"
    build: Optional[Callable] = None   # rebuild: (old module, target class) -> new module sharing its parameters;
                                       # subclass: module -> the class it becomes


def _hf_rms_norm(old, target_cls):
    """``<Family>RMSNorm(hidden_size, eps)``: ``weight * x / sqrt(mean(x^2) + eps)`` with the
    weight in a parameter ``weight`` and eps in ``variance_epsilon`` (Llama convention)."""
    weight = old.weight
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", None))
    # Built on the meta device: the fresh parameter is replaced by the old one at once,
    # so nothing is allocated for it.
    new = target_cls(tuple(weight.shape), eps=eps, elementwise_affine=True, device="meta", dtype=weight.dtype)
    new.weight = weight
    return new


def _hf_offset_rms_norm(old, target_cls):
    """``GemmaRMSNorm(dim, eps)``: ``(1 + weight) * x / sqrt(mean(x^2) + eps)``, weight and eps as named."""
    return target_cls(old.weight, old.eps)


def _hf_causal_lm_class(module):
    from llmfast import hf

    return hf.causal_lm_class(type(module))


class Unsupported(Exception):
    """Raised by a ``rebuild`` row's ``build`` to leave a match alone (reported as skipped, with the reason)."""


# The activation module a transformers gated MLP calls, by class name -> GatedMLP's activation.
# Read from the module that runs (not from the config: Gemma2 names it hidden_activation).
_HF_GATED_ACT_MODULES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "gelu_tanh",
                         "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "GELUActivation": "gelu"}


def _hf_gated_mlp(old, target_cls):
    """``<Family>MLP``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Llama convention), or
    Phi-3's packed ``gate_up_proj`` (gate first) with ``activation_fn``. The new GatedMLP holds
    the very same Linear modules (parameters, hooks and optimizer references stay)."""
    act = getattr(old, "act_fn", None) or getattr(old, "activation_fn", None)
    activation = _HF_GATED_ACT_MODULES.get(type(act).__name__)
    if type(act) is torch.nn.GELU:
        activation = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if activation is None:
        raise Unsupported(f"its activation {type(act).__name__} has no fused gated kernel")
    packed = hasattr(old, "gate_up_proj")
    first, down = (old.gate_up_proj if packed else old.gate_proj), old.down_proj
    # Built on the meta device: its fresh Linears are replaced by the old ones at once.
    new = target_cls(first.in_features, down.in_features, bias=down.bias is not None, activation=activation,
                     packed=packed, device="meta", dtype=down.weight.dtype)
    if packed:
        new.gate_up_proj = old.gate_up_proj
    else:
        new.gate_proj, new.up_proj = old.gate_proj, old.up_proj
    new.down_proj = down
    return new


# Families verified by tests/test_patch.py with tiny random configs (logits and every
# parameter's gradient match the unpatched model). GPT-2's norms are torch.nn.LayerNorm,
# covered by the torch row.
# Qwen3's q_norm/k_norm (over the head dim) are Qwen3RMSNorms too.
HF_RMS_NORM_FAMILIES = ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Phi3")
HF_OFFSET_RMS_NORM_FAMILIES = ("Gemma", "Gemma2", "Gemma3")
# The causal-LM loss: llmfast.hf.CAUSAL_LM_HEADS (model types whose head the fused forward reproduces)
HF_CAUSAL_LM_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# Gated MLPs: tests/test_glu.py checks each family's patched model against the unpatched one.
HF_MLP_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Gemma3", "Phi3")
# Attention: tests/test_patch.py (whole model) and tests/test_hf_attention_variants.py (windows, soft-cap,
# sinks) check each family against its unpatched model, left padding included.
HF_ATTENTION_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                            "gpt_oss", "gpt2")
# Rotary embedding: tests/test_patch.py checks each family's patched forward runs llmfast's kernel.
HF_ROPE_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

RULES: tuple = (
    Rule("softmax", TorchClass("Softmax"), "Softmax", "retype"),
    Rule("log_softmax", TorchClass("LogSoftmax"), "LogSoftmax", "retype"),
    Rule("layer_norm", TorchClass("LayerNorm"), "LayerNorm", "retype"),
    Rule("rms_norm", TorchClass("RMSNorm"), "RMSNorm", "retype"),
    Rule("attention", TorchClass("MultiheadAttention"), "MultiheadAttention", "retype"),
    Rule("transformer_encoder_layer", TorchClass("TransformerEncoderLayer"), "TransformerEncoderLayer", "retype"),
    Rule("rms_norm", HFClass(rf"({'|'.join(HF_RMS_NORM_FAMILIES)})RMSNorm"), "RMSNorm", "rebuild", _hf_rms_norm),
    Rule("rms_norm", HFClass(rf"({'|'.join(HF_OFFSET_RMS_NORM_FAMILIES)})RMSNorm"), "llmfast.hf:OffsetRMSNorm",
         "rebuild", _hf_offset_rms_norm),
    Rule("fused_linear_cross_entropy", HFCausalLM(HF_CAUSAL_LM_MODEL_TYPES), "fused_linear_cross_entropy", "subclass",
         _hf_causal_lm_class),
    Rule("glu", HFClass(rf"({'|'.join(HF_MLP_FAMILIES)})MLP"), "GatedMLP", "rebuild", _hf_gated_mlp),
    Rule("attention", HFModel(HF_ATTENTION_MODEL_TYPES), "llmfast", "attn_implementation"),
    Rule("rope", HFModel(HF_ROPE_MODEL_TYPES), "llmfast.hf:apply_rotary_pos_emb", "module_function"),
)

OPS = tuple(dict.fromkeys(r.op for r in RULES))


# ----------------------------------------------------------------------------------
# The handle


@dataclass
class Swap:
    path: str      # where in the model ("" is the model itself)
    source: str    # what was there
    target: str    # what is there now
    carry: str


@dataclass
class PatchHandle:
    """What :func:`patch` changed, and how to change it back.

    ``swapped``: one :class:`Swap` per module path changed (a module shared by several
    parents appears once per path). ``skipped``: ``(path, reason)`` for matches that
    were left alone. Usable as a context manager: leaving the ``with`` block undoes.
    """

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    _undo: list = field(default_factory=list, repr=False)
    active: bool = True

    def undo(self) -> None:
        """Restore every module class, module and config name :func:`patch` changed."""
        for action in reversed(self._undo):
            action()
        self._undo.clear()
        self.active = False

    def counts(self) -> dict:
        out: dict = {}
        for s in self.swapped:
            key = f"{s.source} -> {s.target}"
            out[key] = out.get(key, 0) + 1
        return out

    def report(self) -> str:
        lines = [f"llmfast.patch: {len(self.swapped)} swapped" + ("" if self.active else " (undone)")]
        lines += [f"  {n:4d} x {k}" for k, n in self.counts().items()]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    {p or '<model>'}: {why}" for p, why in self.skipped]
        return "\n".join(lines)

    def __str__(self):
        return self.report()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


# ----------------------------------------------------------------------------------


def _select(ops) -> list:
    if ops is None:
        return list(RULES)
    if isinstance(ops, str):
        ops = [ops]
    ops = list(ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"llmfast.patch: unknown op(s) {unknown}; known: {list(OPS)}")
    return [r for r in RULES if r.op in ops]


def _target_module_class(name: str):
    """``llmfast.nn.<name>``, or ``Class`` of module ``mod`` for ``"mod:Class"``."""
    import importlib

    import llmfast.nn

    if ":" in name:
        mod, _, cls = name.partition(":")
        return getattr(importlib.import_module(mod), cls, None)
    return getattr(llmfast.nn, name, None)


def _type_name(obj) -> str:
    t = obj if isinstance(obj, type) else type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def patch(model: torch.nn.Module, ops: Optional[Iterable[str]] = None) -> PatchHandle:
    """Swap ``model``'s supported modules for llmfast's, in place; returns a :class:`PatchHandle`.

    ``ops``: the op families to patch (default: all of :data:`OPS`): ``"softmax"``,
    ``"log_softmax"``, ``"layer_norm"``, ``"rms_norm"``, ``"attention"``,
    ``"transformer_encoder_layer"``, ``"fused_linear_cross_entropy"`` (a Hugging Face
    causal LM's training loss; the output's ``logits`` is None when it took the loss), ``"glu"``
    (Hugging Face gated MLPs), ``"rope"`` (Hugging Face rotary embeddings).

    >>> handle = llmfast.patch(model)
    >>> print(handle.report())
    >>> handle.undo()
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"llmfast.patch: expected a torch.nn.Module, got {type(model).__name__}")
    rules = _select(ops)
    handle = PatchHandle()

    # Find every match first, then change things: a swap never changes what later rows see.
    # named_modules(remove_duplicate=False) lists a shared module under each of its paths.
    plan = []  # (rule, path, parent, child name, module)
    for path, module in model.named_modules(remove_duplicate=False):
        parent, name = None, None
        if path:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
        # Every matching row applies: a causal LM is both a loss row's and the attention row's
        # match (the rows replacing modules match disjoint classes).
        for rule in rules:
            if rule.source.matches(module):
                plan.append((rule, path, parent, name, module))

    retyped: dict = {}   # id(module) -> llmfast class, so a shared module is retyped once
    rebuilt: dict = {}   # id(module) -> replacement, so a shared module maps to one replacement
    configs: dict = {}   # id(config) -> config, so a config shared by nested models is set once
    routed: set = set()  # modelling modules seen by the rope row (a model and its inner model share one)
    for rule, path, parent, name, module in plan:
        source = _type_name(module)
        if rule.carry in ("retype", "rebuild", "subclass") and "forward" in module.__dict__:
            handle.skipped.append((path, f"{source}.forward is replaced on the instance (hooks such as "
                                         "accelerate's); swapping its class would not reach it"))
            continue
        if rule.carry == "retype":
            target = _target_module_class(rule.target)
            if target is None:
                handle.skipped.append((path, f"llmfast.nn.{rule.target} is not available in this build"))
                continue
            if not issubclass(target, type(module)):
                raise TypeError(f"llmfast.patch: rule {rule} retypes, but {_type_name(target)} does not "
                                f"subclass {source}")
            if id(module) not in retyped:
                old_cls = type(module)
                module.__class__ = target
                retyped[id(module)] = target
                handle._undo.append(lambda m=module, c=old_cls: setattr(m, "__class__", c))
            handle.swapped.append(Swap(path, source, _type_name(target), rule.carry))
        elif rule.carry == "rebuild":
            target = _target_module_class(rule.target)
            if target is None:
                handle.skipped.append((path, f"llmfast.nn.{rule.target} is not available in this build"))
                continue
            if parent is None:
                handle.skipped.append((path, "the model itself matches; patch its parent instead"))
                continue
            new = rebuilt.get(id(module))
            if new is None:
                try:
                    new = rule.build(module, target)
                except Unsupported as e:
                    handle.skipped.append((path, f"{source}: {e}"))
                    continue
                new.train(module.training)
                # Hooks registered on the old module keep firing on its replacement.
                for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
                    getattr(new, attr).update(getattr(module, attr))
                rebuilt[id(module)] = new
            setattr(parent, name, new)
            handle._undo.append(lambda p=parent, n=name, m=module: setattr(p, n, m))
            handle.swapped.append(Swap(path, source, _type_name(new), rule.carry))
        elif rule.carry == "subclass":
            if id(module) not in retyped:
                old_cls = type(module)
                target = rule.build(module)
                module.__class__ = target
                retyped[id(module)] = target
                handle._undo.append(lambda m=module, c=old_cls: setattr(m, "__class__", c))
            handle.swapped.append(Swap(path, source, f"{source} with llmfast {rule.target} loss", rule.carry))
        elif rule.carry == "attn_implementation":
            from llmfast import hf

            config = module.config
            if id(config) in configs:
                continue
            configs[id(config)] = config
            hf.register()
            # Sub-configs too: the setter recurses into them, so their old names are kept for undo.
            previous = [(c, c._attn_implementation) for c in _config_tree(config)]
            if config._attn_implementation == rule.target:
                continue
            config._attn_implementation = rule.target
            handle._undo.append(lambda prev=previous: [setattr(c, "_attn_implementation_internal", a)
                                                       for c, a in prev])
            handle.swapped.append(Swap(path, f"attn_implementation={previous[0][1]!r}",
                                       f"attn_implementation={rule.target!r}", rule.carry))
        elif rule.carry == "module_function":
            from llmfast import hf

            if type(module).__module__ in routed:
                continue
            routed.add(type(module).__module__)
            name, why = hf.rotary_module(module)
            if name is None:
                handle.skipped.append((path, why))
                continue
            undo = hf.route(name, "apply_rotary_pos_emb", _target_module_class(rule.target), module)
            if undo is None:  # this model already routes it
                continue
            handle._undo.append(undo)
            handle.swapped.append(Swap(path, f"{name}.apply_rotary_pos_emb", rule.target, rule.carry))
        else:  # pragma: no cover - a table typo
            raise ValueError(f"llmfast.patch: unknown carry {rule.carry!r} in {rule}")
    return handle


def _config_tree(config) -> list:
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo += [getattr(c, k, None) for k in getattr(c, "sub_configs", {})]
    return out


# `llmfast.patch` is this function once llmfast is imported; let the table be read from it too.
patch.RULES = RULES
patch.OPS = OPS

"""The bad-input table: every public function of ``llmfast.nn.functional`` and
``llmfast.flash_attn`` x wrong dtype (int, complex, float64 where refused), wrong device
(a meta tensor among CPU ones), wrong rank, mismatched shapes, negative / out-of-range
indices (targets, cu_seqlens, cache_seqlens, block_table, ...), empty tensors and
non-tensor arguments.

A case either must raise one of torch's documented exception types (TypeError,
ValueError, RuntimeError, IndexError) with a message naming the argument, or (``names
is None``: empty tensors, meta-only calls, float64) must return. ``tests/test_bad_input.py``
runs the table on every backend in one child process (``python -m tests.bad_input_table
--backends torch,cpu --start 0``) under a watchdog, so a segfault or a hang is reported by the
case's name instead of taking the test run down.

Protocol on stdout, one line per event: ``BEGIN <i>`` before case i runs, ``END <i> PASS``
or ``END <i> FAIL <why>`` after it, ``DONE`` at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

ALLOWED = (TypeError, ValueError, RuntimeError, IndexError)


@dataclass
class Case:
    name: str                        # function/category/argument
    run: Callable[[], object]
    names: Optional[tuple]           # words the message must contain one of; None: the call must return


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


class Table:
    """Cases of one function: ``good()`` gives valid keyword arguments; each case overrides some."""

    def __init__(self, fn_name: str, call: Callable, good: Callable[[], dict], floats=(), only_tensor: str = ""):
        self.fn_name, self.call, self.good = fn_name, call, good
        self.cases: list[Case] = []
        for arg in floats:   # the generic mutations of every floating tensor argument
            self.bad(f"int/{arg}", arg, lambda g, a=arg: g[a].to(torch.int64))
            self.bad(f"complex/{arg}", arg, lambda g, a=arg: g[a].to(torch.complex64))
            self.bad(f"list/{arg}", arg, lambda g, a=arg: g[a].tolist())
            if arg == only_tensor:   # alone on meta it is a valid (shape-only) call, as in torch
                self.ok(f"meta/{arg}", lambda g, a=arg: {a: g[a].to("meta")})
            else:
                self.bad(f"meta/{arg}", arg, lambda g, a=arg: g[a].to("meta"))

    def _case(self, name, over, names):
        def run():
            kw = self.good()
            kw.update(over(kw))
            return self.call(**kw)
        self.cases.append(Case(f"{self.fn_name}/{name}", run, names))

    def bad(self, name: str, arg: str, value: Callable[[dict], object], names: tuple = ()):
        """``arg`` replaced by ``value(good)`` must raise, naming ``arg`` (or one of ``names``)."""
        self._case(name, lambda g: {arg: value(g)}, (arg,) + tuple(names))

    def bad_many(self, name: str, over: Callable[[dict], dict], names: tuple):
        self._case(name, over, names)

    def ok(self, name: str, over: Callable[[dict], dict]):
        self._case(name, over, None)


def tables() -> list[Table]:
    from llmfast import flash_attn as FA
    from llmfast.nn import functional as LF

    out = []
    # ---------------------------------------------------------------- softmax, log_softmax
    for fn_name in ("softmax", "log_softmax"):
        t = Table(fn_name, getattr(LF, fn_name), lambda: dict(input=_x(2, 3, 5), dim=-1), floats=("input",),
                  only_tensor="input")
        t.bad("range/dim", "dim", lambda g: 3, names=("Dimension",))
        t.bad("range/dim_neg", "dim", lambda g: -4, names=("Dimension",))
        t.bad("type/dim", "dim", lambda g: "last")
        t.bad("type/scale", "scale", lambda g: "x")
        t.bad("dtype/dtype", "dtype", lambda g: torch.int32)
        t.bad("shape/mask", "mask", lambda g: torch.ones(4, dtype=torch.bool))
        t.bad("int/mask", "mask", lambda g: torch.ones(5, dtype=torch.int64))
        t.bad("meta/mask", "mask", lambda g: torch.ones(5, dtype=torch.bool, device="meta"))
        t.bad("list/mask", "mask", lambda g: [True] * 5)
        t.bad_many("rank/is_causal", lambda g: dict(input=_x(5), is_causal=True), ("is_causal",))
        t.ok("empty/rows", lambda g: dict(input=_x(0, 5)))
        t.ok("empty/cols", lambda g: dict(input=_x(2, 0)))
        t.ok("empty/masked", lambda g: dict(input=_x(0, 5), mask=torch.ones(5, dtype=torch.bool)))
        t.ok("float64/input", lambda g: dict(input=_x(2, 5, dtype=torch.float64)))
        out.append(t)
    # ---------------------------------------------------------------- layer_norm, rms_norm (+ in place)
    for fn_name in ("layer_norm", "rms_norm", "layer_norm_", "rms_norm_"):
        centered = fn_name.startswith("layer")
        good = (lambda: dict(input=_x(2, 3, 8), normalized_shape=(8,), weight=_x(8), bias=_x(8))) if centered else \
            (lambda: dict(input=_x(2, 3, 8), normalized_shape=(8,), weight=_x(8)))
        params = ("weight", "bias") if centered else ("weight",)
        floats = ("input",) + params + ("residual",)

        def good_r(good=good):
            return dict(good(), residual=_x(2, 3, 8))
        t = Table(fn_name, getattr(LF, fn_name), good_r, floats=floats)
        if not centered:   # torch's rms_norm takes complex input: so does llmfast's
            t.cases = [c for c in t.cases if c.name != f"{fn_name}/complex/input"]
            if not fn_name.endswith("_"):
                t.ok("complex/input", lambda g: dict(input=g["input"].to(torch.complex64), weight=None, residual=None))
        t.bad("shape/normalized_shape", "normalized_shape", lambda g: (7,))
        t.bad("empty/normalized_shape", "normalized_shape", lambda g: ())
        t.bad("type/normalized_shape", "normalized_shape", lambda g: "8")
        t.bad("type/normalized_shape_elem", "normalized_shape", lambda g: (8.0,))
        t.bad("rank/normalized_shape", "normalized_shape", lambda g: (2, 2, 3, 8))
        for p in params:
            t.bad(f"shape/{p}", p, lambda g: _x(7))
            t.bad(f"rank/{p}", p, lambda g: _x(1, 8))
        t.bad("type/eps", "eps", lambda g: "x")
        if centered:
            t.bad_many("mixed/bias", lambda g: dict(input=g["input"].half(), residual=None, weight=g["weight"].half()),
                       ("bias",))
        t.bad("shape/residual", "residual", lambda g: _x(2, 8))
        t.bad("dtype/residual", "residual", lambda g: _x(2, 3, 8, dtype=torch.float16))
        t.ok("empty/rows", lambda g: dict(input=_x(0, 8), residual=_x(0, 8)))
        t.ok("float64/input", lambda g: {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in g.items()})
        if fn_name.endswith("_"):
            t.bad("shape/out", "out", lambda g: _x(2, 8))
            t.bad("list/out", "out", lambda g: [0.0])
            t.bad("meta/out", "out", lambda g: torch.empty(2, 3, 8, device="meta"))
            t.bad_many("overlap/out", lambda g: dict(out=g["input"][:, :, 0:8].as_strided((2, 3, 8), (24, 8, 1), 1)),
                       ("out",))
            t.bad_many("overlap/residual", lambda g: dict(residual=g["input"]), ("residual",))
        out.append(t)
    # ---------------------------------------------------------------- scaled_dot_product_attention
    t = Table("scaled_dot_product_attention", LF.scaled_dot_product_attention,
              lambda: dict(query=_x(2, 2, 4, 8), key=_x(2, 2, 6, 8), value=_x(2, 2, 6, 8)),
              floats=("query", "key", "value"))
    t.bad("rank/query", "query", lambda g: _x(8))
    t.bad("shape/key", "key", lambda g: _x(2, 2, 6, 7))
    t.bad("shape/value", "value", lambda g: _x(2, 2, 5, 8))
    t.bad("batch/key", "key", lambda g: _x(3, 2, 6, 8))
    t.bad("shape/attn_mask", "attn_mask", lambda g: torch.ones(4, 5, dtype=torch.bool))
    t.bad("rank/attn_mask", "attn_mask", lambda g: torch.ones(6, dtype=torch.bool))
    t.bad("int/attn_mask", "attn_mask", lambda g: torch.ones(4, 6, dtype=torch.int64))
    t.bad("meta/attn_mask", "attn_mask", lambda g: torch.ones(4, 6, dtype=torch.bool, device="meta"))
    t.bad("list/attn_mask", "attn_mask", lambda g: [[True] * 6] * 4)
    t.bad_many("causal/attn_mask", lambda g: dict(attn_mask=torch.ones(4, 6, dtype=torch.bool), is_causal=True),
               ("attn_mask",))
    t.bad("range/dropout_p", "dropout_p", lambda g: 1.5)
    t.bad("type/dropout_p", "dropout_p", lambda g: "x")
    t.bad("type/scale", "scale", lambda g: "x")
    t.bad_many("gqa/key", lambda g: dict(query=_x(2, 3, 4, 8), key=_x(2, 2, 6, 8), value=_x(2, 2, 6, 8),
                                         enable_gqa=True), ("key",))
    t.ok("empty/query", lambda g: dict(query=_x(2, 2, 0, 8)))
    t.ok("empty/key", lambda g: dict(key=_x(2, 2, 0, 8), value=_x(2, 2, 0, 8)))
    t.ok("empty/batch", lambda g: dict(query=_x(0, 2, 4, 8), key=_x(0, 2, 6, 8), value=_x(0, 2, 6, 8)))
    t.ok("float64/all", lambda g: {k: v.double() for k, v in g.items()})
    out.append(t)
    # ---------------------------------------------------------------- flash_attention, flash_attn_func ([B, S, H, D])
    for fn_name, fn in (("flash_attention", LF.flash_attention), ("flash_attn_func", FA.flash_attn_func)):
        t = Table(fn_name, fn, lambda: dict(q=_x(2, 4, 2, 8), k=_x(2, 6, 1, 8), v=_x(2, 6, 1, 8)),
                  floats=("q", "k", "v"))
        t.bad("rank/q", "q", lambda g: _x(4, 2, 8))
        t.bad("shape/k", "k", lambda g: _x(2, 6, 1, 7))
        t.bad("shape/v", "v", lambda g: _x(2, 5, 1, 8))
        t.bad("heads/k", "k", lambda g: _x(2, 6, 3, 8), names=("heads",))
        t.ok("empty/q", lambda g: dict(q=_x(2, 0, 2, 8)))
        t.ok("empty/k", lambda g: dict(k=_x(2, 0, 1, 8), v=_x(2, 0, 1, 8)))
        if fn_name == "flash_attention":   # torch-style options
            t.bad("shape/attn_mask", "attn_mask", lambda g: torch.ones(5, 6, dtype=torch.bool))
            t.bad("int/attn_mask", "attn_mask", lambda g: torch.ones(4, 6, dtype=torch.int64))
            t.bad("type/seed", "seed", lambda g: 1.5)
            t.bad("type/scale", "scale", lambda g: "x")
            t.bad("range/dropout_p", "dropout_p", lambda g: -0.1)
        else:                              # FlashAttention 2's options
            t.bad("type/window_size", "window_size", lambda g: 5)
            t.bad("range/window_size", "window_size", lambda g: (-2, 0))
            t.bad("range/softcap", "softcap", lambda g: -1.0)
            t.bad("type/softmax_scale", "softmax_scale", lambda g: "x")
            t.bad("range/dropout_p", "dropout_p", lambda g: 1.5)
            t.bad("dtype/alibi_slopes", "alibi_slopes", lambda g: _x(2, dtype=torch.float16))
            t.bad("shape/alibi_slopes", "alibi_slopes", lambda g: _x(3))
            t.bad("meta/alibi_slopes", "alibi_slopes", lambda g: torch.ones(2, device="meta"))
            t.bad("shape/sinks", "sinks", lambda g: _x(3))
            t.bad("int/sinks", "sinks", lambda g: torch.ones(2, dtype=torch.int64))
            t.bad("meta/sinks", "sinks", lambda g: torch.ones(2, device="meta"))
        out.append(t)
    # ---------------------------------------------------------------- cross_entropy
    t = Table("cross_entropy", LF.cross_entropy,
              lambda: dict(input=_x(4, 5), target=torch.tensor([0, 4, 2, 1]), weight=_x(5).abs()),
              floats=("input", "weight"))
    t.bad("range/target", "target", lambda g: torch.tensor([0, 5, 2, 1]))
    t.bad("negative/target", "target", lambda g: torch.tensor([0, -1, 2, 1]))
    t.bad("range/target_uint8", "target", lambda g: torch.tensor([0, 200, 2, 1], dtype=torch.uint8))
    t.bad_many("range/target_nd", lambda g: dict(input=_x(4, 5, 2), target=torch.tensor([[0, 9]] * 4)), ("target",))
    t.bad("int32/target", "target", lambda g: torch.tensor([0, 4, 2, 1], dtype=torch.int32))
    t.bad("meta/target", "target", lambda g: torch.tensor([0, 4, 2, 1], device="meta"))
    t.bad("list/target", "target", lambda g: [0, 4, 2, 1])
    t.bad("shape/target", "target", lambda g: torch.tensor([0, 4, 2]))
    t.bad("rank/target", "target", lambda g: torch.tensor([[0, 4, 2, 1]]))
    t.bad("shape/probs_target", "target", lambda g: _x(4, 6).softmax(-1))
    t.bad("shape/weight", "weight", lambda g: _x(4).abs())
    t.bad("rank/input", "input", lambda g: _x())
    t.bad("value/reduction", "reduction", lambda g: "avg")
    t.bad("range/label_smoothing", "label_smoothing", lambda g: 1.5)
    t.bad("type/ignore_index", "ignore_index", lambda g: "x")
    t.ok("empty/rows", lambda g: dict(input=_x(0, 5), target=torch.zeros(0, dtype=torch.long)))
    t.ok("ignored/all", lambda g: dict(target=torch.full((4,), -100)))
    t.ok("float64/input", lambda g: dict(input=g["input"].double(), weight=None))
    out.append(t)
    # ---------------------------------------------------------------- fused_linear_cross_entropy
    t = Table("fused_linear_cross_entropy", LF.fused_linear_cross_entropy,
              lambda: dict(hidden=_x(4, 8), weight=_x(5, 8), target=torch.tensor([0, 4, 2, 1]), bias=_x(5),
                           class_weight=_x(5).abs()),
              floats=("hidden", "weight", "bias", "class_weight"))
    t.bad("range/target", "target", lambda g: torch.tensor([0, 5, 2, 1]))
    t.bad("negative/target", "target", lambda g: torch.tensor([0, -3, 2, 1]))
    t.bad("int32/target", "target", lambda g: torch.tensor([0, 4, 2, 1], dtype=torch.int32))
    t.bad("meta/target", "target", lambda g: torch.tensor([0, 4, 2, 1], device="meta"))
    t.bad("list/target", "target", lambda g: [0, 4, 2, 1])
    t.bad("shape/target", "target", lambda g: torch.tensor([0, 4, 2]))
    t.bad("shape/weight", "weight", lambda g: _x(5, 7))
    t.bad("rank/weight", "weight", lambda g: _x(40))
    t.bad("rank/hidden", "hidden", lambda g: _x())
    t.bad("dtype/weight", "weight", lambda g: _x(5, 8, dtype=torch.float16))
    t.bad("shape/bias", "bias", lambda g: _x(4))
    t.bad("shape/class_weight", "class_weight", lambda g: _x(4).abs())
    t.bad("value/chunk_size", "chunk_size", lambda g: 0)
    t.bad("range/softcap", "softcap", lambda g: -1.0)
    t.bad("type/softcap", "softcap", lambda g: "x")
    t.bad("type/dtype", "dtype", lambda g: torch.int32)
    t.bad("value/reduction", "reduction", lambda g: "avg")
    t.ok("empty/rows", lambda g: dict(hidden=_x(0, 8), target=torch.zeros(0, dtype=torch.long)))
    out.append(t)
    # ---------------------------------------------------------------- perplexity
    t = Table("perplexity", LF.perplexity, lambda: dict(input=_x(2, 3, 5), target=torch.randint(0, 5, (2, 3))),
              floats=("input",))
    t.bad("range/target", "target", lambda g: torch.full((2, 3), 5))
    t.bad("negative/target", "target", lambda g: torch.full((2, 3), -2))
    t.bad("shape/target", "target", lambda g: torch.zeros(2, 2, dtype=torch.long))
    t.bad("list/target", "target", lambda g: [[0, 1, 2]] * 2)
    t.bad("rank/input", "input", lambda g: _x())
    t.bad_many("list/input_loss", lambda g: dict(input=[2.0], target=None), ("input",))
    t.ok("loss/input", lambda g: dict(input=torch.tensor(2.0), target=None))
    t.ok("empty/rows", lambda g: dict(input=_x(0, 5), target=torch.zeros(0, dtype=torch.long)))
    out.append(t)
    # ---------------------------------------------------------------- swiglu, geglu
    for fn_name in ("swiglu", "geglu"):
        t = Table(fn_name, getattr(LF, fn_name), lambda: dict(gate=_x(3, 8), up=_x(3, 8)), floats=("gate", "up"))
        t.bad("shape/up", "up", lambda g: _x(3, 7))
        t.bad("dtype/up", "up", lambda g: _x(3, 8, dtype=torch.float16))
        t.bad_many("packed/gate_odd", lambda g: dict(gate=_x(3, 7), up=None), ("gate",))
        t.bad_many("packed/gate_0d", lambda g: dict(gate=_x(), up=None), ("gate",))
        if fn_name == "geglu":
            t.bad("value/approximate", "approximate", lambda g: "erf")
        t.ok("empty/rows", lambda g: dict(gate=_x(0, 8), up=_x(0, 8)))
        t.ok("empty/packed", lambda g: dict(gate=_x(2, 0), up=None))
        t.ok("float64/all", lambda g: {k: v.double() for k, v in g.items()})
        out.append(t)
    # ---------------------------------------------------------------- apply_rotary_pos_emb, rotary_embedding
    t = Table("apply_rotary_pos_emb", LF.apply_rotary_pos_emb,
              lambda: dict(q=_x(2, 4, 5, 8), k=_x(2, 1, 5, 8), cos=_x(2, 5, 8), sin=_x(1, 5, 8)),
              floats=("q", "k", "cos", "sin"))
    t.bad("rank/q", "q", lambda g: _x(4, 5, 8))
    t.bad("shape/k", "k", lambda g: _x(2, 1, 5, 6))
    t.bad("seq/cos", "cos", lambda g: _x(2, 4, 8))
    t.bad("batch/cos", "cos", lambda g: _x(3, 5, 8))
    t.bad("odd/cos", "cos", lambda g: _x(2, 5, 7), names=("rotary_dim",))
    t.bad("wide/cos", "cos", lambda g: _x(2, 5, 10), names=("rotary_dim",))
    t.bad("value/unsqueeze_dim", "unsqueeze_dim", lambda g: 0)
    t.ok("empty/batch", lambda g: dict(q=_x(0, 4, 5, 8), k=_x(0, 1, 5, 8), cos=_x(1, 5, 8), sin=_x(1, 5, 8)))
    t.ok("empty/seq", lambda g: dict(q=_x(2, 4, 0, 8), k=_x(2, 1, 0, 8), cos=_x(2, 0, 8), sin=_x(2, 0, 8)))
    t.ok("float64/all", lambda g: {k: v.double() for k, v in g.items()})
    out.append(t)
    t = Table("rotary_embedding", LF.rotary_embedding, lambda: dict(x=_x(2, 5, 3, 8), cos=_x(7, 3), sin=_x(7, 3)),
              floats=("x", "cos", "sin"))
    t.bad("rank/x", "x", lambda g: _x(5, 3, 8))
    t.bad("short/cos", "cos", lambda g: _x(4, 3))
    t.bad("wide/sin", "sin", lambda g: _x(7, 5), names=("cos",))
    t.bad("dtype/cos", "cos", lambda g: _x(7, 3, dtype=torch.float16))
    t.bad("rank/cos", "cos", lambda g: _x(1, 2, 7, 3))
    t.ok("empty/seq", lambda g: dict(x=_x(2, 0, 3, 8)))
    t.ok("float64/all", lambda g: {k: v.double() for k, v in g.items()})
    # flash-attn's seqlen_offsets (cos/sin have 7 rows for S = 5) and packed sequences
    t.bad("range/seqlen_offsets", "seqlen_offsets", lambda g: 3)
    t.bad("negative/seqlen_offsets", "seqlen_offsets", lambda g: -1)
    t.bad("range/seqlen_offsets_tensor", "seqlen_offsets", lambda g: _i32([0, 3]))
    t.bad("negative/seqlen_offsets_tensor", "seqlen_offsets", lambda g: _i32([-1, 0]))
    t.bad("float/seqlen_offsets", "seqlen_offsets", lambda g: torch.tensor([0.0, 1.0]))
    t.bad("shape/seqlen_offsets", "seqlen_offsets", lambda g: _i32([0, 1, 2]))
    t.bad("meta/seqlen_offsets", "seqlen_offsets", lambda g: _i32([0, 1]).to("meta"))
    t.bad("type/seqlen_offsets", "seqlen_offsets", lambda g: 1.0)
    t.ok("tensor/seqlen_offsets", lambda g: dict(seqlen_offsets=torch.tensor([2, 0])))

    def packed(**kw):
        return lambda g: dict(dict(x=_x(9, 3, 8), cu_seqlens=_i32([0, 4, 7]), max_seqlen=5), **kw)
    t.ok("packed/ok", packed())
    t.ok("packed/empty_segments", packed(cu_seqlens=_i32([0, 0, 0]), x=_x(0, 3, 8)))
    t.bad_many("int64/cu_seqlens", packed(cu_seqlens=torch.tensor([0, 4, 7])), ("cu_seqlens",))
    t.bad_many("list/cu_seqlens", packed(cu_seqlens=[0, 4, 7]), ("cu_seqlens",))
    t.bad_many("meta/cu_seqlens", packed(cu_seqlens=_i32([0, 4, 7]).to("meta")), ("cu_seqlens",))
    t.bad_many("range/cu_seqlens", packed(cu_seqlens=_i32([0, 4, 10])), ("cu_seqlens",))
    t.bad_many("negative/cu_seqlens", packed(cu_seqlens=_i32([0, -1, 7])), ("cu_seqlens",))
    t.bad_many("start/cu_seqlens", packed(cu_seqlens=_i32([1, 4, 7])), ("cu_seqlens",))
    t.bad_many("short/max_seqlen", packed(max_seqlen=3), ("max_seqlen",))
    t.bad_many("missing/max_seqlen", packed(max_seqlen=None), ("max_seqlen",))
    t.bad_many("long/max_seqlen", packed(max_seqlen=8), ("cos",))                      # S_ro = 7 < max_seqlen
    t.bad_many("rank/x_packed", packed(x=_x(2, 5, 3, 8)), ("x",))
    t.bad_many("range/seqlen_offsets_packed", packed(seqlen_offsets=_i32([4, 4])), ("seqlen_offsets",))
    t.bad_many("shape/seqlen_offsets_packed", packed(seqlen_offsets=_i32([0, 0, 0])), ("seqlen_offsets",))
    t.bad_many("batch/cos_packed", packed(cos=_x(3, 7, 3), sin=_x(3, 7, 3)), ("cos",))
    out.append(t)
    # ---------------------------------------------------------------- flash_attn_varlen_func
    t = Table("flash_attn_varlen_func", FA.flash_attn_varlen_func,
              lambda: dict(q=_x(10, 2, 8), k=_x(12, 1, 8), v=_x(12, 1, 8), cu_seqlens_q=_i32([0, 4, 10]),
                           cu_seqlens_k=_i32([0, 5, 12]), max_seqlen_q=6, max_seqlen_k=7),
              floats=("q", "k", "v"))
    for cu in ("cu_seqlens_q", "cu_seqlens_k"):
        t.bad(f"int64/{cu}", cu, lambda g, cu=cu: g[cu].long())
        t.bad(f"list/{cu}", cu, lambda g, cu=cu: g[cu].tolist())
        t.bad(f"meta/{cu}", cu, lambda g, cu=cu: g[cu].to("meta"))
        t.bad(f"range/{cu}", cu, lambda g, cu=cu: _i32([0, 4, 13]))
        t.bad(f"negative/{cu}", cu, lambda g, cu=cu: _i32([0, -1, 10]))
        t.bad(f"start/{cu}", cu, lambda g, cu=cu: _i32([1, 4, 10]))
        t.bad(f"rank/{cu}", cu, lambda g, cu=cu: _i32([[0, 4, 10]]))
        t.bad(f"empty/{cu}", cu, lambda g, cu=cu: _i32([]))
    t.bad("short/max_seqlen_q", "max_seqlen_q", lambda g: 5, names=("cu_seqlens_q",))
    t.bad("type/max_seqlen_k", "max_seqlen_k", lambda g: 7.0, names=("cu_seqlens_k",))
    t.bad("batch/cu_seqlens_k", "cu_seqlens_k", lambda g: _i32([0, 12]), names=("cu_seqlens_q",))
    t.bad("rank/q", "q", lambda g: _x(10, 16))
    t.bad("shape/alibi_slopes", "alibi_slopes", lambda g: _x(3, 2))
    t.ok("empty/total", lambda g: dict(q=_x(0, 2, 8), cu_seqlens_q=_i32([0, 0, 0]), max_seqlen_q=0))
    out.append(t)
    # ---------------------------------------------------------------- flash_attn_with_kvcache
    def kv_good():
        return dict(q=_x(2, 1, 2, 8), k_cache=_x(2, 16, 1, 8), v_cache=_x(2, 16, 1, 8), k=_x(2, 1, 1, 8),
                    v=_x(2, 1, 1, 8), cache_seqlens=_i32([3, 5]))
    t = Table("flash_attn_with_kvcache", FA.flash_attn_with_kvcache, kv_good,
              floats=("q", "k_cache", "v_cache", "k", "v"))
    t.bad("rank/q", "q", lambda g: _x(2, 2, 8))
    t.bad("shape/v_cache", "v_cache", lambda g: _x(2, 15, 1, 8))
    t.bad("headdim/k_cache", "k_cache", lambda g: _x(2, 16, 1, 4), names=("head dim",))
    t.bad("heads/k_cache", "k_cache", lambda g: _x(2, 16, 3, 8), names=("heads",))
    t.bad("shape/k", "k", lambda g: _x(2, 1, 1, 4))
    t.bad("missing/v", "v", lambda g: None)
    t.bad("negative/cache_seqlens", "cache_seqlens", lambda g: _i32([-1, 3]))
    t.bad("range/cache_seqlens", "cache_seqlens", lambda g: _i32([3, 16]))
    t.bad("negative/cache_seqlens_int", "cache_seqlens", lambda g: -1)
    t.bad("range/cache_seqlens_int", "cache_seqlens", lambda g: 16)
    t.bad("int64/cache_seqlens", "cache_seqlens", lambda g: torch.tensor([3, 5]))
    t.bad("shape/cache_seqlens", "cache_seqlens", lambda g: _i32([3, 5, 1]))
    t.bad("meta/cache_seqlens", "cache_seqlens", lambda g: _i32([3, 5]).to("meta"))
    t.bad("float/cache_seqlens", "cache_seqlens", lambda g: 3.0)
    paged = lambda g, table: dict(k_cache=_x(5, 4, 1, 8), v_cache=_x(5, 4, 1, 8), block_table=table)  # noqa: E731
    t.bad_many("range/block_table", lambda g: paged(g, _i32([[0, 1], [2, 5]])), ("block_table",))
    t.bad_many("negative/block_table", lambda g: paged(g, _i32([[-1, 0], [2, 3]])), ("block_table",))
    t.bad_many("int64/block_table", lambda g: paged(g, torch.tensor([[0, 1], [2, 3]])), ("block_table",))
    t.bad_many("shape/block_table", lambda g: paged(g, _i32([0, 1, 2, 3])), ("block_table",))
    t.bad_many("meta/block_table", lambda g: paged(g, _i32([[0, 1], [2, 3]]).to("meta")), ("block_table",))
    t.bad_many("capacity/block_table", lambda g: paged(g, _i32([[0], [2]])), ("cache_seqlens", "block_table"))
    t.bad("range/cache_batch_idx", "cache_batch_idx", lambda g: _i32([0, 2]))
    t.bad("negative/cache_batch_idx", "cache_batch_idx", lambda g: _i32([-1, 0]))
    t.bad("negative/cache_leftpad", "cache_leftpad", lambda g: _i32([-1, 0]))
    t.bad("meta/cache_leftpad", "cache_leftpad", lambda g: _i32([0, 0]).to("meta"))
    t.bad("missing/rotary_sin", "rotary_sin", lambda g: _x(16, 2), names=("rotary_cos",))
    t.bad_many("short/rotary_cos", lambda g: dict(rotary_cos=_x(4, 2), rotary_sin=_x(4, 2)), ("rotary_cos",))
    t.bad_many("queries/rotary_cos", lambda g: dict(q=_x(2, 4, 2, 8), causal=True, rotary_cos=_x(6, 2),
                                                    rotary_sin=_x(6, 2)), ("rotary_cos",))
    t.bad_many("wide/rotary_cos", lambda g: dict(rotary_cos=_x(16, 5), rotary_sin=_x(16, 5)), ("rotary_dim",))
    t.bad("shape/alibi_slopes", "alibi_slopes", lambda g: _x(3))
    t.bad("meta/alibi_slopes", "alibi_slopes", lambda g: torch.ones(2, device="meta"))
    t.bad("range/num_splits", "num_splits", lambda g: -1)
    t.bad("type/window_size", "window_size", lambda g: 5)
    t.bad("range/window_size", "window_size", lambda g: (-3, 0))
    t.bad("type/softcap", "softcap", lambda g: "x")
    t.bad("range/softcap", "softcap", lambda g: -1.0)
    t.bad("type/softmax_scale", "softmax_scale", lambda g: "x")
    t.ok("empty/new_keys", lambda g: dict(k=_x(2, 0, 1, 8), v=_x(2, 0, 1, 8)))
    t.ok("empty/cache", lambda g: dict(k_cache=_x(2, 0, 1, 8), v_cache=_x(2, 0, 1, 8), k=None, v=None,
                                       cache_seqlens=0))
    t.ok("float64/all", lambda g: {k: (v.double() if v.is_floating_point() else v) for k, v in g.items()})
    out.append(t)
    return out


CASES: list[Case] = []


def cases() -> list[Case]:
    if not CASES:
        CASES.extend(c for t in tables() for c in t.cases)
    return CASES


def judge(case: Case) -> Optional[str]:
    """None when the case behaves, else why not."""
    from llmfast.backends import BackendUnavailableError
    try:
        with torch.no_grad():
            result = case.run()
    except BackendUnavailableError as e:   # the chosen backend refuses the dtype: documented, and names it
        return None if case.names is None else f"{type(e).__name__} instead of an argument check: {e}"
    except ALLOWED as e:
        if case.names is None:
            return f"raised {type(e).__name__}: {e}"
        msg = str(e)
        if not any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", msg, re.I) for n in case.names):
            return f"{type(e).__name__} does not name {' or '.join(case.names)}: {msg}"
        return None
    except Exception as e:   # noqa: BLE001 - any other type is the failure being looked for
        return f"raised {type(e).__name__} (not TypeError/ValueError/RuntimeError/IndexError): {e}"
    if case.names is not None:
        return f"returned {type(result).__name__} instead of raising"
    return None


def selftest_cases() -> list[Case]:
    """Cases that misbehave on purpose, so the watchdog itself is tested: a segfault, a hang, a pass."""
    import signal
    import time
    return [Case("selftest/segfault", lambda: os.kill(os.getpid(), signal.SIGSEGV), ("x",)),
            Case("selftest/hang", lambda: time.sleep(600), ("x",)),
            Case("selftest/raises", lambda: torch.empty(2).view(3), ("shape",))]


def main(argv=None):
    """Run cases ``start..`` of the table x ``--backends`` (index ``b * len(table) + i``)."""
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="auto")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--selftest", action="store_true")
    a = p.parse_args(argv)
    import llmfast
    torch.set_num_threads(1)
    todo = selftest_cases() if a.selftest else cases()
    names = a.backends.split(",")
    for i in range(a.start, len(names) * len(todo)):
        print(f"BEGIN {i}", flush=True)
        with llmfast.backend(names[i // len(todo)]):
            why = judge(todo[i % len(todo)])
        print(f"END {i} PASS" if why is None else f"END {i} FAIL {why!r}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LLMFAST_CUDA_EMU", "1")
    sys.exit(main())

"""One declaration per kernel entry point: schema, fake, Triton twin, autograd.

A *kernel* is one entry point of an op with one schema (``norm_fwd``, ``norm_bwd``,
...). :func:`kernel` declares it once and that registers everything torch needs:

* ``llmfast::<name>``, the native op: the schema is defined here, the C++ kernels are
  registered by ``llmfast._C`` for CPU (``csrc/cpu/<op>.cpp``) and CUDA
  (``csrc/cuda/<op>.cu``) with ``TORCH_LIBRARY_IMPL`` (the dispatcher accepts kernels
  before their schema and checks the C++ signature against it when it arrives);
* ``llmfast_emu::<name>``, the same schema when the CUDA warp emulator is loaded
  (``LLMFAST_CUDA_EMU=1``, tests only): ``csrc/cuda/<op>.cu`` compiled for the CPU
  (``llmfast._emu``), serving the ``cuda`` backend on CPU tensors;
* ``llmfast::<name>_triton``, a ``torch.library.custom_op`` with the same schema that
  calls the launcher in ``kernels/<op>.py``;
* the fake (meta) implementation on all of them, and, for a forward, the autograd
  formula, bound on each backend to that backend's backward kernel.

Why ``custom_op`` and not ``triton_op`` for the Triton twin: ``custom_op`` passes
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` under the Triton
interpreter (``triton_op``'s fake-tensor tracing reads data pointers and fails
there), so the same tests hold on CPU and GPU. Inductor then treats each kernel as
opaque, which costs nothing for a single fused kernel.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from llmfast.backends import _extension

_extension()  # llmfast._C registers the CPU/CUDA kernels the schemas below bind to

_NATIVE = torch.library.Library("llmfast", "DEF")


def emulator_requested() -> bool:
    """``LLMFAST_CUDA_EMU=1``: run the ``cuda`` backend's kernels on CPU tensors, emulated."""
    return os.environ.get("LLMFAST_CUDA_EMU", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def emulator():
    """(library, None) when the emulated CUDA kernels are loaded, else (None, reason)."""
    if not emulator_requested():
        return None, "set LLMFAST_CUDA_EMU=1 to run the CUDA kernels on CPU tensors through the warp emulator"
    try:
        from llmfast import _emu  # noqa: F401  (registers llmfast_emu::* CPU kernels)
    except ImportError as e:
        return None, f"llmfast._emu (the CUDA kernels built for the CPU emulator) is not built ({e})"
    return torch.library.Library("llmfast_emu", "DEF"), None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype (statistics, losses, parameter gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launcher(path: str) -> Callable:
    """``"module:function"`` of llmfast.kernels, imported on first call (no Triton at import)."""
    module, fn = path.split(":")

    def call(*args):
        return getattr(importlib.import_module(f"llmfast.kernels.{module}"), fn)(*args)
    return call


@dataclass
class Kernel:
    """A declared kernel entry point; ``on(backend, device_type)`` is its op there."""

    name: str
    schema: str
    triton: Optional[object] = None  # the custom op, or None without a Triton kernel
    emu: bool = False

    def on(self, backend: str, device_type: str = "cuda"):
        if backend == "triton":
            if self.triton is None:
                raise RuntimeError(f"llmfast::{self.name} has no Triton kernel")
            return self.triton
        if backend == "cuda" and device_type == "cpu":
            return getattr(torch.ops.llmfast_emu, self.name)  # the warp emulator (tests)
        return getattr(torch.ops.llmfast, self.name)

    def variants(self):
        """(backend, device_type) naming each registration: native (CPU and CUDA keys), emulated, Triton."""
        return [("cpu", "cpu")] + ([("cuda", "cpu")] if self.emu else []) + ([("triton", "cpu")] if self.triton else [])


KERNELS: dict[str, Kernel] = {}


def kernel(name: str, schema: str, fake: Callable, *, triton: Optional[str] = None, mutates: tuple = (),
           autograd: Optional[tuple] = None) -> Kernel:
    """Declare the kernel ``llmfast::<name>`` with ``schema`` (``"(Tensor x, ...) -> Tensor"``).

    ``fake(*args)`` returns empty outputs of the right shapes; ``triton`` names the
    launcher (``"<module>:<function>"`` in ``kernels/``) of the Triton twin; ``mutates``
    names the arguments written in place. ``autograd = (backward_kernel, setup_context,
    backward)`` makes it differentiable: ``backward(ctx, bwd, *grads)`` receives as
    ``bwd`` the backward kernel of the same backend.
    """
    _NATIVE.define(name + schema)
    torch.library.register_fake(f"llmfast::{name}")(fake)
    emu_lib, _ = emulator()
    if emu_lib is not None:
        emu_lib.define(name + schema)
        torch.library.register_fake(f"llmfast_emu::{name}")(fake)
    twin = None
    if triton is not None:
        twin = torch.library.custom_op(f"llmfast::{name}_triton", _launcher(triton), mutates_args=mutates,
                                       schema=schema)
        twin.register_fake(fake)
    k = Kernel(name, schema, twin, emu_lib is not None)
    if autograd is not None:
        bwd, setup_context, backward = autograd
        for where in k.variants():
            target = k.on(*where)
            if isinstance(target, torch._ops.OpOverloadPacket):  # register_autograd takes the name
                target = target._qualified_op_name
            torch.library.register_autograd(target, functools.partial(_bound_backward, backward, bwd.on(*where)),
                                            setup_context=setup_context)
    KERNELS[name] = k
    return k


def _bound_backward(backward, bwd_op, ctx, *grads):
    return backward(ctx, bwd_op, *grads)


# Double backward. The kernels' backward ops are not themselves differentiable, so a
# backward run with ``create_graph=True`` (the only time autograd runs a backward with
# grad mode on) would hand back gradients with no graph: second derivatives silently
# wrong or missing. In that case the ops compute their backward from the torch
# reference instead, with differentiable torch ops. torch.compile traces backward
# with grad mode off, so compiled graphs keep the kernels.


def create_graph() -> bool:
    """True inside a backward that must itself be differentiable (``create_graph=True``)."""
    return torch.is_grad_enabled()


def grads_by_recompute(fn, inputs, needed, cotangents):
    """Gradients of ``fn(*inputs)`` (a tensor or a tuple) for the ``needed`` inputs, with graph.

    ``inputs`` are the saved tensors (None allowed); a needed one that does not require
    grad (only the cotangent does) is differentiated through a detached leaf copy.
    Returns one entry per input: the gradient, or None where not needed.
    """
    leaves = [t if (t is None or not need or t.requires_grad) else t.detach().requires_grad_()
              for t, need in zip(inputs, needed)]
    with torch.enable_grad():
        outs = fn(*leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
    wrt = [t for t, need in zip(leaves, needed) if need and t is not None]
    if not pairs or not wrt:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], create_graph=True,
                                   allow_unused=True))
    out = []
    for t, need in zip(leaves, needed):
        g = next(got) if (need and t is not None) else None
        out.append(torch.zeros_like(t) if (g is None and need and t is not None) else g)
    return out


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last dim, the layout the kernels check: x itself, a copy,
    or, where the stride addresses nothing (a last dim of size <= 1, or no elements, where
    ``.contiguous()`` keeps any strides), a view of x with stride 1 there."""
    if x.stride(-1) == 1:
        return x
    if x.shape[-1] <= 1 or x.numel() == 0:
        return x.as_strided(x.shape, x.stride()[:-1] + (1,))
    return x.contiguous()

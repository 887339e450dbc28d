"""Backend registry: which implementation of an op runs, and why the others can't.

Four backends implement every op behind one API:

========  =====================================================  ======================
name      runs on                                                 code
========  =====================================================  ======================
triton    CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``  ``kernels/<op>.py``
cuda      CUDA tensors                                            ``csrc/cuda/<op>.cu``
cpu       CPU tensors                                             ``csrc/cpu/<op>.cpp``
torch     anywhere (the reference, and the last fallback)         ``llmfast/reference.py``
========  =====================================================  ======================

The choice is ``"auto"`` by default (the fastest available for the tensor's
device), the ``LLMFAST_BACKEND`` environment variable, or the
:func:`backend` context manager.  Asking for a backend that cannot run an op
raises a :class:`BackendUnavailableError` that says why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, field

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
_CHOICES = ("auto",) + BACKENDS

# "auto" tries these in order. On a GPU the Triton kernels are autotuned and win or
# tie; the CUDA ones are next. On a CPU the interpreted Triton path is for tests only.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on this device."""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every kernel backend takes


@dataclass
class OpSpec:
    """What an op declares about its backends.

    ``kernel``: the forward kernel (``llmfast.ops._library.Kernel``): its native op
    holds the C++ CPU/CUDA kernels, its Triton twin (if any) the Triton one.
    ``dtypes``: the dtypes the kernel backends take (the torch backend takes any float);
    ``cpu_dtypes``: the cpu backend's, when it takes more (float64).
    ``notes``: per-backend remarks shown by ``llmfast info`` (e.g. features that are
    served by the reference).
    ``features``: the optional features of the op (``{"window", "softcap", ...}``) that
    each backend's kernels implement; a backend not listed implements them all. A call
    that needs a feature a backend lacks runs on the next backend that has it, or on
    the torch reference (see :func:`resolve`).
    """

    name: str
    kernel: object = None
    dtypes: tuple = FLOAT_DTYPES
    cpu_dtypes: tuple | None = FLOAT_DTYPES + (torch.float64,)
    notes: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    def supports(self, backend: str, needs: frozenset) -> bool:
        """Whether ``backend``'s kernels implement every optional feature in ``needs``."""
        have = self.features.get(backend)
        return backend == "torch" or have is None or needs <= have

    def dtypes_for(self, backend: str) -> tuple:
        """The dtypes ``backend``'s kernels take (the cpu backend may take more, e.g. float64)."""
        return self.cpu_dtypes if (backend == "cpu" and self.cpu_dtypes) else self.dtypes


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


# ----------------------------------------------------------------------------------
# Environment probes (cached: they don't change within a process)


@functools.lru_cache(maxsize=None)
def _extension():
    """(module, None) when llmfast._C imports, else (None, reason)."""
    try:
        from llmfast import _C  # noqa: F401
    except ImportError as e:  # a Triton-only or torch-only install
        return None, f"llmfast._C is not built ({e}); reinstall with `pip install --no-build-isolation -e .`"
    return _C, None


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return None, f"triton is not installed ({e})"
    return triton, None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _has_kernel(schema: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(schema, key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def why_not(op: str, backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``op`` on ``device_type``, else the reason."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_CHOICES}")
    kernel = OPS[op].kernel
    if backend == "torch":
        return None
    if device_type not in ("cpu", "cuda"):
        return f"llmfast kernels run on cpu and cuda tensors, not {device_type}"
    if kernel is None:
        return f"{op} has no llmfast kernel"
    # a backend/device mismatch first: it holds whatever this machine has
    if backend == "cpu" and device_type != "cpu":
        return "the cpu backend runs CPU tensors"
    if backend == "cuda" and device_type == "cpu":
        return _emulated(kernel)
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if backend == "triton":
        if kernel.triton is None:
            return f"{op} has no Triton kernel"
        _, err = _triton()
        if err:
            return err
        if device_type == "cpu" and not triton_interpret():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return None
    ext, err = _extension()
    if err:
        return err
    key = "CPU" if backend == "cpu" else "CUDA"
    if backend == "cuda" and not getattr(ext, "with_cuda", False):
        return "llmfast._C was built without CUDA (no nvcc or LLMFAST_BUILD_CUDA=0 at build time)"
    if not _has_kernel(f"llmfast::{kernel.name}", key):
        return f"llmfast._C has no {key} kernel for llmfast::{kernel.name}"
    return None


def _emulated(kernel) -> str | None:
    """Why the cuda backend can't run CPU tensors: it can, through the warp emulator (tests only)."""
    from llmfast.ops._library import emulator

    _, err = emulator()
    if err:
        return f"the cuda backend runs CUDA tensors ({err})"
    if not _has_kernel(f"llmfast_emu::{kernel.name}", "CPU"):
        return f"llmfast._emu has no emulated kernel for llmfast::{kernel.name}"
    return None


def available(op: str, device="cpu") -> dict[str, str | None]:
    """Map each backend to ``None`` (it can run ``op`` on ``device``) or the reason it can't."""
    device_type = torch.device(device).type
    return {b: why_not(op, b, device_type) for b in BACKENDS}


# ----------------------------------------------------------------------------------
# Selection

_ENV = os.environ.get("LLMFAST_BACKEND", "auto").strip().lower() or "auto"
if _ENV not in _CHOICES:
    raise ValueError(f"LLMFAST_BACKEND={_ENV!r}; expected one of {_CHOICES}")
# A context variable, not a global: each thread and each asyncio task sees the choice of
# its own `with llmfast.backend(...)` blocks (new threads start from LLMFAST_BACKEND).
_choice = contextvars.ContextVar("llmfast_backend", default=_ENV)


def current() -> str:
    """The backend name in force in this thread / task: ``"auto"`` or one of :data:`BACKENDS`."""
    return _choice.get()


# torch.compile reads the choice once, while tracing (see _resolve_cached below).
current._dynamo_marked_constant = True


@contextlib.contextmanager
def backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (per thread and asyncio task).

    >>> with llmfast.backend("cpu"):
    ...     y = llmfast.nn.functional.softmax(x, dim=-1)

    A graph compiled by ``torch.compile`` keeps the backend it was traced with.
    """
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    token = _choice.set(name.lower())
    try:
        yield
    finally:
        _choice.reset(token)


def _resolve_cached(op: str, device_type: str, dtype: torch.dtype, requested: str,
                    needs: frozenset = frozenset()) -> str:
    return _resolve(op, device_type, dtype, requested, needs)


# What torch.compiler.assume_constant_result does (torch 2.14: it sets this flag), without
# its `import torch._dynamo`, which took a third of `import llmfast` (~1.1 s). The choice
# is then a constant when torch.compile traces an op (tests/test_*: compile fullgraph).
_resolve_cached._dynamo_marked_constant = True


@functools.lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, dtype: torch.dtype, requested: str, needs: frozenset = frozenset()) -> str:
    spec = OPS[op]
    if requested == "auto":
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            if name == "torch" or (why_not(op, name, device_type) is None and dtype in spec.dtypes_for(name)
                                   and spec.supports(name, needs)):
                return name
        return "torch"
    reason = why_not(op, requested, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"llmfast backend {requested!r} cannot run {op} on {device_type}: {reason}")
    dtypes = spec.dtypes_for(requested)
    if requested != "torch" and dtype not in dtypes:
        raise BackendUnavailableError(
            f"llmfast backend {requested!r} does not support {dtype} for {op}; supported: {list(dtypes)}")
    if not spec.supports(requested, needs):
        # the backend runs this op, but its kernels lack a feature of this call: the
        # reference serves it (as for float64 on the GPU backends); `llmfast info` says which
        return "torch"
    return requested


def resolve(op: str, tensor: torch.Tensor, needs: frozenset = frozenset()) -> str:
    """The backend that runs ``op`` for ``tensor`` under the current setting.

    ``needs``: the optional features of this call (:attr:`OpSpec.features`); a backend
    whose kernels lack one is passed over (auto) or replaced by the torch reference
    (an explicit choice).
    """
    return _resolve_cached(op, tensor.device.type, tensor.dtype, current(), needs)
